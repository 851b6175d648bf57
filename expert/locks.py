"""An inter-process lock on a file, for work that two runs must not do at the same time.

`fcntl.flock` rather than a lock file's mere existence: the OS drops the lock when its
holder dies, kill -9 included, so a crashed run never blocks the next one.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)
POLL_S = 0.2  # how often a waiter tries the lock
REMIND_S = 300  # how often a waiter says again whom it waits for


@contextlib.contextmanager
def exclusive(path: Path, what: str):
    """Hold an exclusive lock on `path` for the `with` block, waiting for it if needed.

    The lock file is deleted on release so nothing is left behind; a process that opened the
    old file and then got its lock finds that the path names another file (or none) and retries.
    """
    try:
        import fcntl
    except ImportError:  # no flock (Windows): concurrent runs are not guarded there
        yield
        return
    path = Path(path)
    while True:
        with open(path, "a+") as handle:
            _wait_for(handle, path, what)
            if _names(path, handle):
                _say_who_holds(handle, what)
                try:
                    yield
                finally:
                    path.unlink(missing_ok=True)  # before the close below releases the lock
                return


def _wait_for(handle, path: Path, what: str) -> None:
    """Take the lock, saying who holds it meanwhile: at first, then every REMIND_S, so a log
    that stops moving names the process to look at (a live one: the OS frees a dead one's lock)."""
    import fcntl

    started = time.monotonic()
    reminded = None
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        waited = time.monotonic() - started
        if reminded is None or waited - reminded >= REMIND_S:
            holder = Path(path).read_text().strip() if Path(path).is_file() else ""
            log.info("waiting for another process %s (it holds %s%s)%s", what, path,
                     f": {holder}" if holder else "", f", {waited / 60:.0f} min so far" if reminded is not None else "")
            reminded = waited
        time.sleep(POLL_S)


def _say_who_holds(handle, what: str) -> None:
    """Write this process into the lock file, for a waiter to name."""
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, {what}, since "
                 f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    handle.flush()


def _names(path: Path, handle) -> bool:
    """Whether `path` still names the open file `handle`."""
    try:
        return os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def exclusive_if_free(path: Path):
    """Hold the lock on `path` for the `with` block if no process holds it now: yields True,
    else False at once (a live holder is at work, leave its files alone)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): liveness cannot be told, so never
        yield False
        return
    path = Path(path)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        if not _names(path, handle):  # released and deleted by its holder meanwhile: no debris then
            yield False
            return
        try:
            yield True
        finally:
            path.unlink(missing_ok=True)
