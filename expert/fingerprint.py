"""Content fingerprints of external inputs (data files, model folders).

A stage's key includes the fingerprint of each file it reads from outside the artifact
store, so new data or new weights at the same path rerun what depends on them. Hashing a
multi-GB model on every run would dominate a cached rerun, so digests are memoised in a
small JSON file keyed by (absolute path, inode, size, mtime, ctime): a file is re-hashed only when it
changes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from expert.artifacts import file_digest
from expert.atomic import write_text_atomic
from expert.errors import ExpertError

_SKIP_NAMES = {".git", "__pycache__", ".cache"}


class FingerprintCache:
    """sha256 of files, memoised on disk by (path, inode, size, mtime_ns, ctime_ns).

    Size and mtime alone are not enough: `rsync -a`, `cp -p`, `tar x` and `wget -N` give a
    corrected file its old timestamp, often at the same size. The ctime cannot be set by a
    program and a replaced file gets a new inode, so either marks the content as new."""

    def __init__(self, cache_file: str | Path | None = None):
        self.cache_file = Path(cache_file) if cache_file else None
        self._memo: dict[str, str] = {}
        if self.cache_file and self.cache_file.is_file():
            try:
                self._memo = json.loads(self.cache_file.read_text())
            except ValueError:
                self._memo = {}  # a corrupt memo only costs a re-hash

    def file(self, path: str | Path) -> str:
        path = Path(path).resolve()
        st = path.stat()
        memo_key = f"{path}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"
        digest = self._memo.get(memo_key)
        if digest is None:
            digest = file_digest(path)
            self._memo[memo_key] = digest
            self._save()
        return digest

    def path(self, path: str | Path) -> str:
        """Fingerprint of a file, or of a folder (relative names + file digests)."""
        p = Path(path)
        if p.is_file():
            return "sha256:" + self.file(p)
        if p.is_dir():
            h = hashlib.sha256()
            for f in sorted(_files_under(p)):
                h.update(f.relative_to(p).as_posix().encode() + b"\0")
                h.update(self.file(f).encode() + b"\0")
            return "sha256-tree:" + h.hexdigest()
        raise ExpertError(f"cannot fingerprint '{path}': no such file or folder")

    def _save(self) -> None:
        if not self.cache_file:
            return
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.cache_file, json.dumps(self._memo))


def _files_under(folder: Path):
    """Every file a reader of `folder` would see: symlinked subfolders are followed (a glob such
    as MMLU's `test/*_test.csv` follows them, so their content is part of the data), each real
    folder once, so a link back up the tree ends instead of looping."""
    seen = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if d not in _SKIP_NAMES]
        for name in files:
            yield Path(root) / name
