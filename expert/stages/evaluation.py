"""Stages that measure: evaluation of one model on one benchmark, and the final report."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from expert.stages.base import Stage

# Evaluation settings without an mmlu_ prefix that only MMLU scoring reads.
MMLU_ONLY = ("prefix_cache",)


@dataclass(frozen=True)
class Evaluate(Stage):
    """Score one model (+ optional adapter) on one benchmark's evaluation split."""

    benchmark: str = "pubmedqa"
    # Where the pieces run (expert.fanout.FanOut), None: in this process. Not part of the
    # key: it changes where the scores are computed, not what they are.
    fan_out: Any = field(default=None, compare=False, repr=False)
    name: ClassVar[str] = "evaluate"
    # 2: report.md caveats an MMLU subset among full-MMLU results and says whose categories it
    # uses; non-finite scores are an error, not the first choice
    version: ClassVar[int] = 2
    report_files: ClassVar[tuple[str, ...]] = ("metrics.json", "report.md")  # the scores, and their timing

    def key_config(self, config):
        # Only the settings that matter for this benchmark: a new MMLU subset must not
        # rerun the PubMedQA evaluation.
        other = "mmlu_" if self.benchmark == "pubmedqa" else "pubmedqa_"
        canon = {k: v for k, v in config.canonical().items()
                 if not k.startswith(other) and not (self.benchmark == "pubmedqa" and k in MMLU_ONLY)}
        return {"benchmark": self.benchmark, **canon}

    def split_file(self, config) -> str:
        return f"{config.pubmedqa_split}.parquet" if self.benchmark == "pubmedqa" else "test.parquet"

    def request(self, config, upstream, inputs):
        request = super().request(config, upstream, inputs)
        # Keyed by the content of the split it reads, not by the data artifact's key: a new
        # training fold reformats the data but leaves the test split, and its scores, as they are.
        manifest = json.loads((Path(upstream["data"]["path"]) / "manifest.json").read_text())
        digest = manifest["files"][self.split_file(config)]["sha256"]
        return replace(request, upstream={**request.upstream, "data": f"{self.split_file(config)}@{digest}"})

    def produce(self, config, upstream, inputs, out, progress=None, work_dir=None):
        from expert.evaluation import evaluate

        return evaluate(config, self.benchmark, model_dir=upstream["model"], data_dir=upstream["data"],
                        out_dir=out, adapter_dir=upstream.get("adapter"), progress=progress, fan_out=self.fan_out,
                        work_dir=work_dir)


@dataclass(frozen=True)
class Report(Stage):
    """base vs quantized vs expert, with the published results, in report.md + summary.json."""

    name: ClassVar[str] = "report"
    # 3: where and in what dtype each evaluation scored; 4: results.png, majority row; 5: MMLU notes
    # (a subset is not comparable with published full-MMLU results; the paper's categories, not lm-eval's);
    # 6: the GPTQ kernel each evaluation scored with; 7: where the expert is, and `expert export`
    version: ClassVar[int] = 7

    def key_config(self, config):
        return {k: v for k, v in config.canonical().items() if k != "artifacts_dir"}

    def produce(self, config, upstream, inputs, out, progress=None, work_dir=None):
        from expert.report import write_pipeline_report

        return write_pipeline_report(upstream, self.key_config(config), out)
