"""Prefect task: the final report (report.md + summary.json), also shown in the UI."""

from __future__ import annotations

from prefect.artifacts import create_markdown_artifact

from expert.pipeline_config import PipelineConfig
from expert.stages import Report
from tasks.stage import run_stage


def report(config: PipelineConfig, workspace: str, parts: dict[str, dict | None], force: bool = False) -> dict:
    ref = run_stage(Report(), config, workspace, upstream=parts, force=force, label="report")
    with open(f"{ref['path']}/report.md") as f:
        create_markdown_artifact(f.read(), key="expert-report", description=f"EXPERT report: {config.name}")
    return ref
