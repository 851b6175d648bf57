"""Prefect task: evaluate a model (+ adapter) on one benchmark, and show the results in the UI."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from expert.evaluation import EvalConfig, markdown_tables
from expert.stages import Evaluate
from tasks.fanout import fan_out
from tasks.stage import run_stage


def evaluate(benchmark: str, config: EvalConfig, workspace: str, model: dict, data: dict | None,
             adapter: dict | None = None, label: str = "", force: bool = False) -> dict[str, str] | None:
    if data is None:  # benchmark switched off in the config
        return None
    name = f"evaluate {benchmark}" + (f" ({label})" if label else "")
    ref = run_stage(Evaluate(benchmark, fan_out=fan_out(config.runner)), config, workspace, force=force,
                    label=name, upstream={"model": model, "data": data, "adapter": adapter})
    publish(benchmark, ref, label)
    return ref


def evaluate_all(config: EvalConfig, workspace: str, base: dict, quantized: dict | None, expert: dict,
                 pubmedqa: dict, mmlu: dict | None, force: bool = False) -> dict[str, dict | None]:
    """PubMedQA: base, quantized (zero-shot) and the expert; MMLU: base and the expert."""
    runs = {
        "pubmedqa/base": evaluate("pubmedqa", config, workspace, base, pubmedqa, label="base", force=force),
        "pubmedqa/expert": evaluate("pubmedqa", config, workspace, quantized or base, pubmedqa, adapter=expert,
                                    label="expert", force=force),
        "mmlu/base": evaluate("mmlu", config, workspace, base, mmlu, label="base", force=force),
        "mmlu/expert": evaluate("mmlu", config, workspace, quantized or base, mmlu, adapter=expert, label="expert",
                                force=force),
    }
    if quantized is not None:
        runs["pubmedqa/quantized"] = evaluate("pubmedqa", config, workspace, quantized, pubmedqa, label="quantized",
                                              force=force)
    return runs


def publish(benchmark: str, ref: dict, label: str) -> None:
    """Every table of the evaluation's report.md, and the report itself, as Prefect artifacts."""
    folder = Path(ref["path"])
    metrics = json.loads((folder / "metrics.json").read_text())
    key = artifact_key(benchmark, label)
    for title, rows in markdown_tables(metrics, run_name=label).items():
        create_table_artifact(rows, key=artifact_key(key, title),
                              description=f"{benchmark} ({label}): {title.replace('_', ' ')}")
    report = folder / "report.md"
    if report.is_file():
        create_markdown_artifact(report.read_text(), key=f"{key}-report", description=f"{benchmark} ({label}): report")


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes only) from free text such as
    the evaluate deployment's `label` ("Llama-3.1 8B_v2" -> "llama-3-1-8b-v2")."""
    return re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-") or "model"
