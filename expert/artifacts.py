"""Content-addressed artifact store: `artifacts/<stage>/<key>/`.

A stage's key is the hash of its name, its version, its canonical config, the keys and file
digests of its upstream artifacts (`content_id`) and the fingerprints of its external inputs
(files, hub revisions), so the same inputs always map to the same folder and any change maps
to a new one.

An artifact is complete only when its `manifest.json` exists and matches: the producer
writes into a temporary folder beside the target, the manifest (config, upstream ids,
file digests, package versions, timings) is written last, and the folder is renamed into
place. A crash leaves at most a `.tmp-*` folder, which never counts (and the next build in
that stage deletes it, unless a live build of its key holds the key's lock).

Two processes asking for the same artifact at once (two runs of one config) do the work once:
`build` holds an advisory lock per key (`fcntl.flock`, dropped by the OS when its holder
dies, kill -9 included); the second waits, then finds the first one's artifact and returns it.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

from expert.errors import ExpertError
from expert.locks import exclusive, exclusive_if_free

log = logging.getLogger(__name__)

WORK_PREFIX = ".work-"  # + key: a build's resumable work (GPTQ layers, training checkpoints, scored MMLU
#   subjects and checkpoints)
_DEBRIS = (".tmp-", ".trash-")  # + key + "-" + a random suffix: what a killed build leaves
LOCK_PREFIX = ".lock-"  # + key: the lock a build of that key holds while it works (see key_lock)

MANIFEST = "manifest.json"
EXTERNAL = "external"  # the stage name of refs to folders made outside the store
KEY_LENGTH = 16
# Files up to this size are re-hashed on every use; larger ones (model shards of GBs) are
# checked by size and a digest of SAMPLE_BLOCKS blocks spread over the file, which reads a few
# MB instead of the whole file (a full check is `verify(..., full=True)`, `expert verify`).
QUICK_DIGEST_LIMIT = 8 * 1024 * 1024
SAMPLE_BLOCKS = 32
SAMPLE_BLOCK_BYTES = 64 * 1024
# Hashing more than this (a full check, a new artifact's manifest) shows a progress bar: a 33B
# model's files take minutes.
PROGRESS_MIN_BYTES = 1 << 30
# Stage names and keys become folder names: nothing that could climb out of the store's root.
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# A run checks an artifact several times (flow, task, build); one warning per damaged folder.
_WARNED: set[tuple[str, str]] = set()
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
    upstream: dict[str, str] = field(default_factory=dict)  # role -> upstream `content_id`
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


def content_id(ref: dict[str, str]) -> str:
    """How a downstream key names an upstream artifact: its key and a digest of its files.

    The key alone is not enough: a forced rebuild (or one after the folder was deleted) keeps
    the key and may change the content (a code fix, GPU nondeterminism). Were the stages
    after it keyed by the key only, a run stopped right after that rebuild would leave them
    cached on the old content, and the next run would reuse them.
    """
    if ref.get("stage") == EXTERNAL:
        return ref["key"]  # a folder made outside the store is keyed by its content already
    manifest = _manifest_of(Path(ref["path"]), ref["key"])
    # Reports (timings, logs: see ArtifactStore.build) say how the build went, not what it made:
    # a rebuild that makes the same files leaves the stages after it cached.
    files = {rel: desc["sha256"] for rel, desc in manifest["files"].items() if not desc.get("report")}
    return f"{ref['key']}@{hashlib.sha256(canonical_json(files).encode()).hexdigest()[:KEY_LENGTH]}"


def _manifest_of(folder: Path, key: str) -> dict[str, Any]:
    """The manifest of artifact `key` at `folder` or above it: a ref may name a folder inside its
    artifact (select's adapter/)."""
    for candidate in (folder, *folder.parents):
        if (candidate / MANIFEST).is_file():
            manifest = json.loads((candidate / MANIFEST).read_text())
            if manifest.get("key") == key:
                return manifest
    raise ExpertError(f"{folder} is not (inside) the artifact {key}: no manifest.json of that key there or "
                      "above it. Give the artifact's folder, or a folder made outside the store by its path")


def file_digest(path: Path, chunk: int = 1 << 20, on_read: Callable[[int], Any] | None = None) -> str:
    """sha256 of the file; `on_read(n)` after each n bytes read (a progress bar's update)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            if on_read is not None:
                on_read(len(block))
    return h.hexdigest()


def sampled_digest(path: Path, size: int | None = None) -> str:
    """sha256 of the file's size and of SAMPLE_BLOCKS blocks at evenly spaced offsets (the first
    and the last block included). It catches truncation, a replaced or re-written file and
    damage inside the sampled blocks; damage between them needs the full check."""
    size = Path(path).stat().st_size if size is None else size
    h = hashlib.sha256(str(size).encode() + b"\0")
    span = max(size - SAMPLE_BLOCK_BYTES, 0)
    offsets = sorted({span * i // (SAMPLE_BLOCKS - 1) for i in range(SAMPLE_BLOCKS)})
    with open(path, "rb") as f:
        for offset in offsets:
            f.seek(offset)
            h.update(f.read(SAMPLE_BLOCK_BYTES))
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
        for part in (stage, key):
            if not _SAFE_NAME.fullmatch(part):
                raise ValueError(f"{part!r} cannot name an artifact folder (letters, digits, '_', '.', '-' only)")
        return self.root / stage / key

    def work_dir(self, request: StageRequest) -> Path:
        """A scratch folder that survives a crash, to resume from (training checkpoints, scored MMLU
        subjects and checkpoints).

        It is keyed like the artifact, so a restarted run with the same inputs finds it, and it
        is deleted once the artifact is published.
        """
        return self.root / request.stage / f"{WORK_PREFIX}{request.key}"

    def get(self, request: StageRequest) -> Artifact | None:
        """The complete artifact for `request`, or None if missing, partial or corrupt."""
        path = self.path(request.stage, request.key)
        problem = verify(path, expected_key=request.key)
        if problem:
            if path.exists() and (str(path), problem) not in _WARNED:  # say once why it is not used
                _WARNED.add((str(path), problem))
                log.warning("not using %s: %s; it will be rebuilt", path, problem)
            return None
        manifest = json.loads((path / MANIFEST).read_text())
        return Artifact(request.stage, request.key, path, manifest)

    def build(
        self,
        request: StageRequest,
        producer: Callable[[Path], dict[str, Any] | None],
        replace: bool = False,
        reports: Sequence[str] = (),
    ) -> Artifact:
        """Run `producer(tmp_dir)` and publish its files atomically under the request key.

        `producer` writes its files into the folder it is given and may return a small
        JSON-safe dict (counts, metrics) that is stored in the manifest under `info`.
        A complete artifact under the key is returned as it is, unless `replace` (a forced
        rerun, e.g. after a code fix that did not change the key): then the work is done again
        and the new folder takes the old one's place once it is complete.
        `reports`: patterns (fnmatch, relative paths) of files that record how the build went
        (timings, logs) and that no later stage computes from. They are verified like every file
        but marked `"report": true` in the manifest, and `content_id` leaves them out.
        """
        target = self.path(request.stage, request.key)
        target.parent.mkdir(parents=True, exist_ok=True)
        with exclusive(key_lock(target.parent, request.key), f"building {request.stage}/{request.key}"):
            existing = None if replace else self.get(request)
            if existing is not None:  # another process built it while we waited for the lock
                log.info("%s was built by another process meanwhile; reusing it", target)
                return existing
            _remove_debris(target.parent, request.key)  # of a killed build: we hold the key's lock
            _remove_abandoned_debris(target.parent, request.key)
            _note_other_work(target.parent, request.key)
            if replace:  # a forced rebuild starts over: not from checkpoints the code before a fix wrote
                shutil.rmtree(self.work_dir(request), ignore_errors=True)
            self._write(request, producer, target, replace, reports)
            # Under the lock: a forced build of the same key waiting for it writes its own
            # checkpoints there next, and they must not be deleted under it.
            shutil.rmtree(self.work_dir(request), ignore_errors=True)
        artifact = self.get(request)
        if artifact is None:  # pragma: no cover - only if the disk lies to us
            raise ExpertError(f"artifact {target} failed verification right after it was written")
        return artifact

    def _write(self, request: StageRequest, producer: Callable[[Path], dict[str, Any] | None],
               target: Path, replace: bool = False, reports: Sequence[str] = ()) -> None:
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
                "files": describe_files(tmp, reports),
                "versions": package_versions(),
                "timings": {"started": started, "finished": time.time(),
                            "seconds": round(time.time() - started, 3)},
            }
            write_json_durably(tmp / MANIFEST, manifest)
            _publish(tmp, target, request.key, replace)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if _is_disk_full(exc):
                raise ExpertError(
                    f"the disk is full: writing the {request.stage} artifact into {target.parent} failed "
                    f"({exc}). Nothing was marked complete and earlier artifacts are untouched; free space "
                    f"on that disk (or set artifacts_dir to another one) and run again"
                ) from exc
            raise

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
    from tqdm.auto import tqdm

    hashed = sum(desc.get("size", 0) for desc in files.values() if full or desc.get("size", 0) <= QUICK_DIGEST_LIMIT)
    with tqdm(total=hashed, unit="B", unit_scale=True, desc=f"checking {Path(path).name}", leave=False,
              disable=hashed < PROGRESS_MIN_BYTES) as bar:
        for rel, desc in files.items():
            f = Path(path) / rel
            if not f.is_file():
                return f"{f}: listed in the manifest but missing"
            if f.stat().st_size != desc["size"]:
                return f"{f}: size {f.stat().st_size} != {desc['size']} in the manifest"
            if full or desc["size"] <= QUICK_DIGEST_LIMIT:
                if file_digest(f, on_read=bar.update) != desc["sha256"]:
                    return f"{f}: content differs from the manifest digest (corrupted?)"
            elif "sampled_sha256" in desc and sampled_digest(f, desc["size"]) != desc["sampled_sha256"]:
                return f"{f}: content differs from the manifest's sampled digest (corrupted?)"
    return None


def verify_tree(root: Path) -> list[tuple[Path, str | None]]:
    """Fully verify every artifact at or under `root` (an artifact folder, a stage folder or the
    whole store): (folder, problem or None) for each folder named like a key."""
    root = Path(root)
    if not root.is_dir():
        raise ExpertError(f"'{root}' is not a folder; give an artifact folder, a stage folder or the artifacts root")
    if (root / MANIFEST).is_file() or _is_key(root.name):
        return [(root, verify(root, full=True))]
    folders = sorted(p for pattern in ("*", "*/*") for p in root.glob(pattern)
                     if p.is_dir() and _is_key(p.name) and "downloads" not in p.relative_to(root).parts)
    if not folders:
        raise ExpertError(f"'{root}' holds no artifact folders (named by a {KEY_LENGTH}-hex-digit key): verify "
                          "checks the artifact store's folders, artifacts/<stage>/<key>, which carry a manifest.json; "
                          "what `expert format` or `expert eval` wrote elsewhere has none")
    return [(p, verify(p, full=True)) for p in folders]


# What else a store's stage folders hold, by name prefix, and what it is.
_LEFTOVERS = {
    WORK_PREFIX: "an unfinished build's resumable work (GPTQ layers, training checkpoints, scored MMLU subjects "
                 "and checkpoints): a run of the same config resumes from it; `expert clean` removes it if that config "
                 "will not run again",
    _DEBRIS[0]: "what a killed build left: the next build in this stage removes it (or `expert clean`)",
    _DEBRIS[1]: "an old folder a killed rebuild was replacing: the next build in this stage removes it (or "
                "`expert clean`)",
}


# `expert eval`'s resumable work beside its --out: `.OUT.work-<key>` (expert/cli.py).
_EVAL_WORK = ("`expert eval`'s scored MMLU subjects: the same command resumes from them; `expert clean` "
              "removes them if it will not run again")


def lock_for(work: Path) -> Path:
    """The lock file a live build holds for its work folder: `.lock-<key>` beside `.work-<key>`,
    `.OUT.lock-<key>` beside `expert eval`'s `.OUT.work-<key>`."""
    head, _, key = work.name.rpartition(WORK_PREFIX)
    return work.parent / f"{head}{LOCK_PREFIX}{key}"


def key_lock(stage_dir: Path, key: str) -> Path:
    """The lock a build of `key` holds in its stage folder, over its work, debris and artifact."""
    return stage_dir / f"{LOCK_PREFIX}{key}"


def leftovers(root: Path) -> list[tuple[Path, str, int]]:
    """(folder, what it is, bytes) of every non-artifact folder in the store's stage folders at or
    under `root` (the store or one stage folder): resumable work and crash debris, which verify
    leaves alone but a user may want to see (a 33B GPTQ build killed midway leaves ~17 GB); in any
    other folder, `expert eval`'s resumable work beside the --out it was given."""
    root = Path(root)
    if (root / MANIFEST).is_file() or _is_key(root.name):  # one artifact: it holds none
        return []
    found = []
    for path in sorted([*root.glob(".*"), *root.glob("*/.*")]):
        what = next((text for prefix, text in _LEFTOVERS.items() if path.name.startswith(prefix)), None)
        if what is None and WORK_PREFIX in path.name[1:]:
            what = _EVAL_WORK
        if what and path.is_dir():
            found.append((path, what, folder_bytes(path)))
    return found


def folder_bytes(folder: Path) -> int:
    """Bytes of the files in `folder`, at any depth."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def _is_key(name: str) -> bool:
    return len(name) == KEY_LENGTH and all(c in "0123456789abcdef" for c in name)


def describe_files(folder: Path, reports: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """A manifest's "files": each file under `folder` by relative path, with its size and sha256
    (and a sampled digest of big ones, for quick checks), marked "report" when it matches `reports`."""
    from tqdm.auto import tqdm

    out = {}
    found = sorted(p for p in folder.rglob("*") if p.is_file())
    total = sum(f.stat().st_size for f in found)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"hashing {folder.name}", leave=False,
              disable=total < PROGRESS_MIN_BYTES) as bar:
        for f in found:
            size = f.stat().st_size
            rel = f.relative_to(folder).as_posix()
            desc: dict[str, Any] = {"size": size, "sha256": file_digest(f, on_read=bar.update)}
            if size > QUICK_DIGEST_LIMIT:
                desc["sampled_sha256"] = sampled_digest(f, size)
            if any(fnmatch.fnmatchcase(rel, pattern) for pattern in reports):
                desc["report"] = True
            out[rel] = desc
    return out


def _is_disk_full(exc: BaseException) -> bool:
    """Whether `exc`, or an exception it was raised from, is the disk (or quota) being full.
    Libraries wrap OSError (pyarrow, safetensors), so the chain and the message both count."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            return True
        if "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def write_json_durably(path: Path, value: Any) -> None:
    """Write `value` as JSON and flush it to disk: a manifest must not outlive a crash half-written."""
    with open(path, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())




def _remove_debris(stage_dir: Path, key: str) -> None:
    for prefix in _DEBRIS:
        for debris in stage_dir.glob(f"{prefix}{key}-*"):
            shutil.rmtree(debris, ignore_errors=True)


def _remove_abandoned_debris(stage_dir: Path, key: str) -> None:
    """Remove what killed builds of other keys left, where no live build holds their key's lock.

    A user whose build was killed often changes the config before the next run, so that key is
    never built again; its half-written folder (17 GB for a 33B GPTQ) would stay for good.
    `.work-<key>` folders (GPTQ, training, MMLU evaluation, selection) are not debris: a run with that
    config resumes from them.
    """
    others = {name.split("-")[1] for name in (p.name for p in stage_dir.iterdir())
              if name.startswith(_DEBRIS) and name.count("-") >= 2} - {key}
    for other in sorted(others):
        with exclusive_if_free(key_lock(stage_dir, other)) as free:
            if free:
                log.info("removing what a killed build of %s/%s left", stage_dir.name, other)
                _remove_debris(stage_dir, other)


def _note_other_work(stage_dir: Path, key: str) -> None:
    """Say, once per stage folder and process, what resumable work of other keys the stage holds.

    It is kept on purpose (a run with that config resumes from it), so nothing removes it
    unasked; but after a config change it is usually dead weight (a killed 33B GPTQ build keeps
    ~17 GB), and the user should hear of it where they look: the run's log.
    """
    others = sorted(p for p in stage_dir.glob(f"{WORK_PREFIX}*") if p.is_dir() and p.name != f"{WORK_PREFIX}{key}")
    if not others or (str(stage_dir), "other work") in _WARNED:
        return
    _WARNED.add((str(stage_dir), "other work"))
    size = sum(folder_bytes(p) for p in others)
    log.info("%s holds the resumable work of %d unfinished build(s) of other configs (%s, %.1f MB): a run "
             "with such a config resumes from it; `expert clean %s` removes it (`--dry-run` lists it)",
             stage_dir, len(others), ", ".join(p.name for p in others[:3]) + (", ..." if len(others) > 3 else ""),
             size / 1e6, stage_dir)


def _publish(tmp: Path, target: Path, key: str, replace: bool = False) -> None:
    """Rename `tmp` into place; an existing incomplete (or, with `replace`, any) folder is moved
    aside first and deleted once the new one is in place, so the name is missing only between
    two renames (not while a model folder is deleted). Readers that already opened its files
    keep reading them (POSIX)."""
    trash = None
    if target.exists():
        if not replace and verify(target, expected_key=key) is None:
            shutil.rmtree(tmp)  # someone else finished the same work first: keep theirs
            return
        trash = target.parent / f".trash-{key}-{uuid.uuid4().hex[:8]}"
        os.rename(target, trash)
    os.rename(tmp, target)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
