"""Prefect task: import the base model into a standard Hugging Face folder."""

from __future__ import annotations

from expert.models import ModelConfig
from expert.stages import ImportModel
from tasks.stage import run_stage


def import_model(config: ModelConfig, workspace: str, force: bool = False) -> dict[str, str]:
    return run_stage(ImportModel(), config, workspace, force=force, label="import model")
