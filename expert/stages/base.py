"""The stage protocol: what a stage fetches, what decides its key, what it writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar

from expert.artifacts import StageRequest, content_id
from expert.config import StageConfig
from expert.workspace import Workspace

Progress = Callable[[int, int], None]


class Stage:
    name: ClassVar[str]
    version: ClassVar[int]
    # Config fields whose content is covered by an input fingerprint, so a moved file or a
    # new spelling of the same hub id does not change the key.
    fingerprinted_fields: ClassVar[tuple[str, ...]] = ()
    # Files that record how a build went (timings, logs), which no later stage computes from:
    # left out of the content digest later keys name (expert.artifacts.content_id), so a rebuild
    # that makes the same model or scores leaves what follows cached. fnmatch patterns.
    report_files: ClassVar[tuple[str, ...]] = ()

    def fetch(self, config: StageConfig, workspace: Workspace) -> dict[str, Any]:
        """External inputs (role -> object with `.path` and `.fingerprint`); network I/O lives here."""
        return {}

    def key_config(self, config: StageConfig) -> dict[str, Any]:
        canon = config.canonical()
        return {k: v for k, v in canon.items() if k not in self.fingerprinted_fields}

    def report_only_upstream(self, config: StageConfig) -> tuple[str, ...]:
        """Upstream roles that feed only `report_files` under `config`: left out of the key, so
        what a report reads does not rebuild what later stages compute from."""
        return ()

    def request(self, config: StageConfig, upstream: dict[str, dict], inputs: dict[str, Any]) -> StageRequest:
        unkeyed = self.report_only_upstream(config)
        return StageRequest(
            stage=self.name,
            version=self.version,
            config=self.key_config(config),
            upstream={role: content_id(ref) for role, ref in sorted(upstream.items()) if role not in unkeyed},
            inputs={role: src.fingerprint for role, src in sorted(inputs.items())},
        )

    def produce(self, config: StageConfig, upstream: dict[str, Path], inputs: dict[str, Any],
                out: Path, progress: Progress | None = None, work_dir: Path | None = None) -> dict[str, Any] | None:
        """Write the stage's files into `out`; `work_dir` survives a crash (for resumable work)."""
        raise NotImplementedError
