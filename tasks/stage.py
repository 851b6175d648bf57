"""One mechanism for every stage task: fetch inputs, check the artifact store, build or reuse.

Prefect's cache key is the stage's content key (stage, version, config, upstream keys and
file digests, input fingerprints), never the run id. Prefect's cached record is trusted only while the
artifact folder itself is complete: the flow-side check in `run_stage` forces a refresh
when the folder is gone or fails verification, so a deleted artifact is rebuilt even
though Prefect still remembers it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from expert.config import StageConfig
from expert.signals import raise_swallowed_stop
from expert.stages import Stage
from expert.workspace import Workspace


def _stage_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    return parameters["cache_key"]


# Downloads retry with backoff inside expert.sources / expert.models (the library is used
# without Prefect too), so this task adds no Prefect retries of its own.
@task(name="fetch", cache_policy=NO_CACHE, persist_result=False)
def fetch_inputs(stage: Stage, config: StageConfig, workspace_root: str) -> dict[str, Any]:
    return stage.fetch(config, Workspace.at(workspace_root))


@task(cache_key_fn=_stage_cache_key, persist_result=True, result_serializer="json",
      cache_result_in_memory=False)
def build_stage(stage: Stage, config: StageConfig, upstream: dict[str, dict], inputs: dict[str, Any],
                workspace_root: str, cache_key: str, forced: bool = False) -> dict[str, str]:
    raise_swallowed_stop()  # one the stage before lost at its very end
    logger = get_run_logger()
    library_logs_at_info()
    store = Workspace.at(workspace_root).store
    request = stage.request(config, upstream, inputs)
    existing = store.get(request)
    if existing is not None and not forced:  # complete on disk, but Prefect had no record of it
        logger.info("%s: reusing the complete artifact %s", stage.name, existing.path)
        return existing.ref()
    if existing is not None:
        logger.info("%s: forced; recomputing %s, which the new result will replace", stage.name, existing.path)
    logger.info("%s: building %s", stage.name, store.path(request.stage, request.key))
    paths = {role: Path(ref["path"]) for role, ref in upstream.items()}
    progress = _ProgressArtifact(f"{stage.name} [{request.key}]")
    work_dir = store.work_dir(request)
    artifact = store.build(request, lambda out: stage.produce(config, paths, inputs, out, progress, work_dir),
                           replace=forced, reports=stage.report_files)
    logger.info("%s: done in %.1f s -> %s", stage.name, artifact.manifest["timings"]["seconds"], artifact.path)
    return artifact.ref()


def run_stage(stage: Stage, config: StageConfig, workspace_root: str | Path,
              upstream: dict[str, dict | None] | None = None, force: bool = False,
              label: str | None = None) -> dict[str, str]:
    """Run `stage` as a Prefect task (inside a flow); returns the artifact's ref."""
    workspace = Workspace.at(workspace_root)
    upstream = {role: ref for role, ref in (upstream or {}).items() if ref is not None}
    inputs = {}
    if type(stage).fetch is not Stage.fetch:
        inputs = fetch_inputs.with_options(task_run_name=f"fetch {label or stage.name}")(
            stage, config, str(workspace.root))
    request = stage.request(config, upstream, inputs)
    # A forced stage reruns, and so does everything downstream of it: a forced ref carries
    # the mark on to the stages that read it (their keys alone would not change when the
    # recomputed artifact is bit-identical, as it is on a CPU).
    force = force or any(ref.get("forced") for ref in upstream.values())
    refresh = force or workspace.store.get(request) is None
    root_tag = hashlib.sha256(str(workspace.root).encode()).hexdigest()[:8]
    task_run = build_stage.with_options(
        name=stage.name, task_run_name=f"{label or stage.name} [{request.key}]", refresh_cache=refresh)
    ref = task_run(stage, config, upstream, inputs, str(workspace.root),
                   cache_key=f"{stage.name}-{request.key}-{root_tag}", forced=force)
    return {**ref, "forced": True} if force else ref


def library_logs_at_info() -> None:
    """The library's own loggers reach the run's log in the UI at INFO.

    PREFECT_LOGGING_EXTRA_LOGGERS (set for deployments in prefect.yaml, and by `expert run`)
    gives them Prefect's handler; their level is still the root's WARNING unless set here.
    """
    from prefect.settings import PREFECT_LOGGING_EXTRA_LOGGERS

    for name in ["expert", *PREFECT_LOGGING_EXTRA_LOGGERS.value()]:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)


def read_json(ref: dict[str, str], name: str):
    """A small JSON file of an artifact (for publishing tables in the UI)."""
    return json.loads((Path(ref["path"]) / name).read_text())


class _ProgressArtifact:
    """A Prefect progress artifact, created on first use and updated at most every 1%; each call is
    also where a stop that library code swallowed is raised again (expert.signals)."""

    def __init__(self, description: str):
        self.description = description
        self.artifact_id = None
        self.last = -1.0

    def __call__(self, done: int, total: int) -> None:
        raise_swallowed_stop()  # a Ctrl-C or SIGTERM that library code caught on its way ends the run here
        pct = 100.0 * done / max(total, 1)
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(pct, description=self.description)
        elif pct - self.last >= 1.0 or done >= total:
            update_progress_artifact(self.artifact_id, pct)
        else:
            return
        self.last = pct
