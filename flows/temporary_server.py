"""Keep Prefect's temporary local server alive through a Ctrl-C of `expert run`.

Without a PREFECT_API_URL, Prefect starts a temporary server (uvicorn, SQLite under
PREFECT_HOME) as a child process of the run, in the run's process group. A terminal's Ctrl-C
signals the whole foreground group, so the server died at the same instant as the flow. Prefect
then could not record that the run stopped: the run stayed "Running" in the UI for good, the
interrupted stage failed with "Connection refused", and the process spent 150 s retrying
before `expert` printed an unexpected ConnectError (the default pipeline, measured). Started in a session of its own, the
server outlives the interrupt long enough to record the stopped run. It is stopped as before,
by Prefect at exit.

Out of the group, the server no longer dies with it: a closed terminal (SIGHUP) or a `kill -9`
of `expert` would leave it running. On Linux it is therefore told to end when `expert` does
(the parent-death signal).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from unittest import mock

_PR_SET_PDEATHSIG = 1  # <sys/prctl.h>


def detach_temporary_server() -> None:
    """Make Prefect start its temporary server in a new session (POSIX; elsewhere a no-op)."""
    if os.name != "posix":
        return
    from prefect.server.api import server

    start = server.SubprocessASGIServer._run_uvicorn_command
    if getattr(start, "detached", False):
        return
    popen = subprocess.Popen
    die_with_parent = _parent_death_signal()

    def detached_popen(*args, **kwargs):
        kwargs.setdefault("start_new_session", True)  # a later Prefect that sets these keeps its own
        kwargs.setdefault("preexec_fn", die_with_parent)
        return popen(*args, **kwargs)

    def start_detached(self):
        # Only the server's own Popen call sees the extra arguments, for the length of that call.
        with mock.patch.object(server.subprocess, "Popen", detached_popen):
            return start(self)

    start_detached.detached = True
    server.SubprocessASGIServer._run_uvicorn_command = start_detached


def _parent_death_signal():
    """A function for the child to run before its exec: SIGTERM it when its parent thread ends
    (Linux prctl; None elsewhere). Prefect starts the server from the main thread, which lives
    as long as `expert`. The libc function is looked up here, in the parent: the child, forked
    from a process with threads, should do no more than call it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    term = int(signal.SIGTERM)

    def die_with_parent() -> None:
        prctl(_PR_SET_PDEATHSIG, term)

    return die_with_parent
