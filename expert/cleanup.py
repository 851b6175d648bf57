"""`expert clean`: remove what unfinished builds left in the artifact store.

A build killed midway leaves its resumable work (`.work-<key>`: GPTQ layer checkpoints, training
checkpoints, scored MMLU subjects; `expert eval` keeps its own beside its --out, `.OUT.work-<key>`)
and perhaps a half-written folder (`.tmp-<key>-*`). A run of
the same config resumes from the first and removes the second; but a user who changed the config
after the crash never runs that key again, and the store keeps gigabytes for nothing (a 33B GPTQ
build's spill alone is ~17 GB). `expert verify` lists them; this removes them, except where a live
build holds the key's lock.

    for path, size, outcome in clean(Path("artifacts"), older_than_days=7, dry_run=True): ...
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Iterator

from expert.artifacts import WORK_PREFIX, key_lock, leftovers, lock_for
from expert.locks import exclusive_if_free

_DAY_S = 86400.0


def clean(root: Path, older_than_days: float = 0.0, dry_run: bool = False) -> Iterator[tuple[Path, int, str]]:
    """(folder, bytes, what happened) for each leftover under `root` last written over
    `older_than_days` ago: "removed", "would be removed" (a dry run), or "in use" (a live build
    holds its key's lock: kept)."""
    cutoff = time.time() - older_than_days * _DAY_S
    for path, _, size in leftovers(root):
        if older_than_days and _last_written(path) > cutoff:
            continue
        with exclusive_if_free(_lock(path)) as free:
            if not free:
                yield path, size, "in use"
            elif dry_run:
                yield path, size, "would be removed"
            else:
                shutil.rmtree(path, ignore_errors=True)
                yield path, size, "removed"


def _lock(path: Path) -> Path:
    """The lock a live build holds: for work (`.work-<key>`, `expert eval`'s `.OUT.work-<key>`) see
    `lock_for`; for debris (`.tmp-<key>-<suffix>`, `.trash-<key>-<suffix>`) its key's `.lock-<key>`."""
    if WORK_PREFIX in path.name:
        return lock_for(path)
    return key_lock(path.parent, path.name.split("-")[1])


def _last_written(folder: Path) -> float:
    """The newest modification time of the folder or anything in it: its build's last activity."""
    return max([folder.stat().st_mtime, *(p.stat().st_mtime for p in folder.rglob("*"))])
