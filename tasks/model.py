"""Prefect tasks: import the base model into a standard Hugging Face folder, or take a given folder."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from expert.models import ModelConfig
from expert.stages import ImportModel
from expert.workspace import Workspace
from tasks.stage import run_stage


def import_model(config: ModelConfig, workspace: str, force: bool = False) -> dict[str, str]:
    return run_stage(ImportModel(), config, workspace, force=force, label="import model")


@task(name="model folder", cache_policy=NO_CACHE, persist_result=False)
def model_folder(path: str, workspace: str) -> dict[str, str]:
    """A model or adapter folder made outside this run, as an upstream ref (keyed by content)."""
    return Workspace.at(workspace).folder_ref(path)
