"""Stages that make the expert: quantize the base, train LoRA on it, select a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from expert.stages.base import Stage

# Evaluation settings that change dev scores, and so the selection.
SCORING_FIELDS = ("batch_size", "max_length", "device", "dtype")


@dataclass(frozen=True)
class Quantize(Stage):
    name: ClassVar[str] = "quantize"
    version: ClassVar[int] = 2  # 2: gptqmodel's own API (group-aware reordering, bfloat16 forwards)
    report_files: ClassVar[tuple[str, ...]] = ("quant_log.csv", "quantization_report.*")  # hold timings

    def fetch(self, config, workspace):
        if config.method != "gptq" or config.calibration == "task":
            return {}
        from expert.sources import fetch

        return {"calibration": fetch(config.calibration, workspace.downloads, workspace.fingerprints)}

    def key_config(self, config):
        # What the quantized weights depend on. The perplexity check (perplexity_samples, and under
        # nf4 or none the pipeline gives it no data at all) writes report files only: a change there
        # rebuilding the base would retrain and re-evaluate everything after it.
        canon = super().key_config(config)
        if config.method != "gptq":
            return {"method": canon["method"]}
        canon.pop("perplexity_samples", None)
        if canon.get("calibration") not in (None, "task"):
            canon["calibration"] = "file"  # its content is an input fingerprint
        return canon

    def report_only_upstream(self, config):
        # With a calibration file the formatted data serves the perplexity check alone.
        return ("data",) if config.calibration != "task" else ()

    def produce(self, config, upstream, inputs, out, progress=None, work_dir=None):
        from expert.quantize import quantize

        if "calibration" in inputs:
            config = config.model_copy(update={"calibration": str(inputs["calibration"].path)})
        return quantize(config, upstream["model"], upstream.get("data"), out, progress=progress, work_dir=work_dir)


@dataclass(frozen=True)
class Train(Stage):
    name: ClassVar[str] = "train"
    version: ClassVar[int] = 3  # 2: memory plan (auto micro-batch, checkpointing); 3: lean activations, precision
    # Speeds, memory and wall clock, and TensorBoard's file named by time, host and process.
    report_files: ClassVar[tuple[str, ...]] = ("summary.json", "train_log.jsonl", "loss.png", "tensorboard/*",
                                               "checkpoints/*/trainer_state.json")

    def produce(self, config, upstream, inputs, out, progress=None, work_dir=None):
        from expert.train import train

        return train(config, upstream["model"], upstream["data"], out, work_dir=work_dir, progress=progress)


@dataclass(frozen=True)
class Select(Stage):
    """Score every checkpoint on the dev split with the evaluator's settings; keep the best."""

    eval_config: Any = field(default=None)
    fan_out: Any = field(default=None, compare=False, repr=False)  # as Evaluate.fan_out
    name: ClassVar[str] = "select"
    version: ClassVar[int] = 1

    def key_config(self, config):
        scoring = self.eval_config.canonical()
        return {**config.canonical(), "scoring": {k: scoring[k] for k in SCORING_FIELDS}}

    def produce(self, config, upstream, inputs, out, progress=None, work_dir=None):
        from expert.select import select_checkpoint

        return select_checkpoint(config, self.eval_config, upstream["model"], upstream["train"],
                                 upstream["data"], out, progress=progress, fan_out=self.fan_out, work_dir=work_dir)
