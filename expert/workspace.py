"""Where a pipeline keeps its outputs: the artifact store, downloads and input digests."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from expert.artifacts import ArtifactStore
from expert.fingerprint import FingerprintCache


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def at(cls, root: str | Path) -> "Workspace":
        return cls(Path(root).expanduser().resolve())

    @cached_property
    def store(self) -> ArtifactStore:
        return ArtifactStore(self.root)

    @property
    def downloads(self) -> Path:
        return self.root / "downloads"

    @cached_property
    def fingerprints(self) -> FingerprintCache:
        return FingerprintCache(self.root / ".fingerprints.json")
