"""Content-addressed artifact store: `artifacts/<stage>/<key>/`.

A stage's key is the hash of its name, its version, its canonical config, the keys of its
upstream artifacts and the fingerprints of its external inputs (files, hub revisions), so
the same inputs always map to the same folder and any change maps to a new one.

An artifact is complete only when its `manifest.json` exists and matches: the producer
writes into a temporary folder beside the target, the manifest (config, upstream keys,
file digests, package versions, timings) is written last, and the folder is renamed into
place. A crash leaves at most a `.tmp-*` folder, which never counts.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from expert.errors import ExpertError

MANIFEST = "manifest.json"
KEY_LENGTH = 16
# Files up to this size are re-hashed on every use; larger ones are checked by size
# (a full check is `verify(..., full=True)`).
QUICK_DIGEST_LIMIT = 8 * 1024 * 1024
VERSIONED_PACKAGES = (
    "torch", "transformers", "peft", "accelerate", "bitsandbytes", "gptqmodel", "optimum",
    "pandas", "pyarrow", "safetensors", "gguf", "prefect", "numpy",
)


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class StageRequest:
    """Everything that determines a stage's output, and so its key."""

    stage: str
    version: int
    config: dict[str, Any]
    upstream: dict[str, str] = field(default_factory=dict)  # role -> upstream artifact key
    inputs: dict[str, str] = field(default_factory=dict)  # role -> external input fingerprint

    @property
    def key(self) -> str:
        payload = canonical_json(
            {"stage": self.stage, "version": self.version, "config": self.config,
             "upstream": self.upstream, "inputs": self.inputs}
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:KEY_LENGTH]


@dataclass(frozen=True)
class Artifact:
    """A complete artifact folder and its manifest."""

    stage: str
    key: str
    path: Path
    manifest: dict[str, Any]

    def ref(self) -> dict[str, str]:
        """The small, JSON-safe handle that Prefect tasks pass around."""
        return {"stage": self.stage, "key": self.key, "path": str(self.path)}


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


class ArtifactStore:
    """The artifact folders under one root (by default `artifacts/`)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def work_dir(self, request: StageRequest) -> Path:
        """A scratch folder that survives a crash (e.g. training checkpoints to resume from).

        It is keyed like the artifact, so a restarted run with the same inputs finds it, and it
        is deleted once the artifact is published.
        """
        return self.root / request.stage / f".work-{request.key}"

    def get(self, request: StageRequest) -> Artifact | None:
        """The complete artifact for `request`, or None if missing, partial or corrupt."""
        path = self.path(request.stage, request.key)
        problem = verify(path, expected_key=request.key)
        if problem:
            return None
        manifest = json.loads((path / MANIFEST).read_text())
        return Artifact(request.stage, request.key, path, manifest)

    def build(
        self,
        request: StageRequest,
        producer: Callable[[Path], dict[str, Any] | None],
    ) -> Artifact:
        """Run `producer(tmp_dir)` and publish its files atomically under the request key.

        `producer` writes its files into the folder it is given and may return a small
        JSON-safe dict (counts, metrics) that is stored in the manifest under `info`.
        """
        target = self.path(request.stage, request.key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".tmp-{request.key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        started = time.time()
        try:
            info = producer(tmp) or {}
            manifest = {
                "stage": request.stage,
                "version": request.version,
                "key": request.key,
                "config": request.config,
                "upstream": request.upstream,
                "inputs": request.inputs,
                "info": info,
                "files": _describe_files(tmp),
                "versions": package_versions(),
                "timings": {"started": started, "finished": time.time(),
                            "seconds": round(time.time() - started, 3)},
            }
            _write_json_durably(tmp / MANIFEST, manifest)
            _publish(tmp, target, request.key)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(self.work_dir(request), ignore_errors=True)
        artifact = self.get(request)
        if artifact is None:  # pragma: no cover - only if the disk lies to us
            raise ExpertError(f"artifact {target} failed verification right after it was written")
        return artifact

    def get_or_build(self, request: StageRequest, producer: Callable[[Path], dict | None]) -> Artifact:
        return self.get(request) or self.build(request, producer)


def verify(path: Path, expected_key: str | None = None, full: bool = False) -> str | None:
    """Return None if `path` is a complete artifact, else a sentence saying why not."""
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        return f"{path}: no {MANIFEST} (missing or interrupted write)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as exc:
        return f"{manifest_path}: unreadable manifest ({exc})"
    if expected_key is not None and manifest.get("key") != expected_key:
        return f"{manifest_path}: key {manifest.get('key')!r} != expected {expected_key!r}"
    for rel, desc in files.items():
        f = Path(path) / rel
        if not f.is_file():
            return f"{f}: listed in the manifest but missing"
        if f.stat().st_size != desc["size"]:
            return f"{f}: size {f.stat().st_size} != {desc['size']} in the manifest"
        if (full or desc["size"] <= QUICK_DIGEST_LIMIT) and file_digest(f) != desc["sha256"]:
            return f"{f}: content differs from the manifest digest (corrupted?)"
    return None


def _describe_files(folder: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        out[f.relative_to(folder).as_posix()] = {"size": f.stat().st_size, "sha256": file_digest(f)}
    return out


def _write_json_durably(path: Path, value: Any) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _publish(tmp: Path, target: Path, key: str) -> None:
    """Rename `tmp` into place; an existing incomplete folder is moved aside first."""
    if target.exists():
        if verify(target, expected_key=key) is None:
            shutil.rmtree(tmp)  # someone else finished the same work first: keep theirs
            return
        trash = target.parent / f".trash-{key}-{uuid.uuid4().hex[:8]}"
        os.rename(target, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.rename(tmp, target)
