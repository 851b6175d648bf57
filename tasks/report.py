"""Prefect task: the final report (report.md + summary.json), also shown in the UI."""

from __future__ import annotations

from pathlib import Path

from prefect.artifacts import create_markdown_artifact

from expert.pipeline_config import PipelineConfig
from expert.report import inline_images
from expert.stages import Report
from tasks.stage import run_stage


def report(config: PipelineConfig, workspace: str, parts: dict[str, dict | None], force: bool = False) -> dict:
    ref = run_stage(Report(), config, workspace, upstream=parts, force=force, label="report")
    folder = Path(ref["path"])
    # The plots (loss, dev scores, MMLU by category) are embedded: the UI has no folder beside it.
    markdown = inline_images((folder / "report.md").read_text(), folder)
    create_markdown_artifact(markdown + f"\n\nFiles: `{folder}`\n", key="expert-report",
                             description=f"EXPERT report: {config.name}")
    return ref
