"""Small files written whole or not at all: a crash leaves the old file or the new one, never half.

The text goes to a temp file beside the target (named by this process, so two writers never share
one), which is then renamed over the target: a rename within a folder is atomic.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
