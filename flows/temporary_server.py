"""Keep Prefect's temporary local server alive through a Ctrl-C of `expert run`.

Without a PREFECT_API_URL, Prefect starts a temporary server (uvicorn, SQLite under
PREFECT_HOME) as a child process of the run, in the run's process group. A terminal's Ctrl-C
signals the whole foreground group, so the server died at the same instant as the flow. Prefect
then could not record that the run stopped: the run stayed "Running" in the UI for good, the
interrupted stage failed with "Connection refused", and the process spent a minute retrying
before `expert` printed an unexpected ConnectError. Started in a session of its own, the
server outlives the interrupt long enough to record the stopped run. It is stopped as before,
by Prefect at exit.
"""

from __future__ import annotations

import os
import subprocess
from unittest import mock


def detach_temporary_server() -> None:
    """Make Prefect start its temporary server in a new session (POSIX; elsewhere a no-op)."""
    if os.name != "posix":
        return
    from prefect.server.api import server

    start = server.SubprocessASGIServer._run_uvicorn_command
    if getattr(start, "detached", False):
        return
    popen = subprocess.Popen

    def start_detached(self):
        # Only the server's own Popen call sees the extra argument, for the length of that call.
        with mock.patch.object(server.subprocess, "Popen",
                               lambda *args, **kwargs: popen(*args, start_new_session=True, **kwargs)):
            return start(self)

    start_detached.detached = True
    server.SubprocessASGIServer._run_uvicorn_command = start_detached
