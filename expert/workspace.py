"""Where a pipeline keeps its outputs: the artifact store, downloads and input digests."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from expert.artifacts import EXTERNAL, MANIFEST, ArtifactStore, verify
from expert.errors import ExpertError
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

    def folder_ref(self, folder: str | Path) -> dict[str, str]:
        """An upstream ref for a folder made outside this run (a model, an adapter).

        One of our complete artifacts keeps its own key; any other folder is keyed by its
        content, so new weights at the same path are evaluated anew.
        """
        path = Path(folder).expanduser().resolve()
        if not path.is_dir():
            raise ExpertError(f"'{folder}' is not a folder: give a model or adapter folder "
                              "(e.g. artifacts/quantize/<key> or artifacts/select/<key>/adapter)")
        if (path / MANIFEST).is_file() and verify(path) is None:
            manifest = json.loads((path / MANIFEST).read_text())
            return {"stage": manifest["stage"], "key": manifest["key"], "path": str(path)}
        digest = hashlib.sha256(self.fingerprints.path(path).encode()).hexdigest()[:16]
        return {"stage": EXTERNAL, "key": digest, "path": str(path)}
