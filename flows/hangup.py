"""A closed terminal (SIGHUP) stops `expert run` the way SIGTERM does: Prefect records the crash.

Prefect turns SIGTERM into a crash it records while a flow runs, but installs nothing for
SIGHUP, whose default action ends the process on the spot: a run whose terminal went away (an
SSH session dropped, a terminal window closed) stayed "Running" in the UI for good, and its task runs
with it. Here SIGHUP goes to whatever handles SIGTERM at that moment (during a flow run,
Prefect's handler, which records the crash and then ends the process with the signal it got),
and outside one it keeps its default. A run started with SIGHUP ignored (`nohup`) keeps ignoring it.
"""

from __future__ import annotations

import os
import signal


def stop_on_hangup() -> None:
    """Route SIGHUP to the SIGTERM handler of the moment (POSIX, main thread; elsewhere a no-op)."""
    hangup = getattr(signal, "SIGHUP", None)
    if hangup is None or signal.getsignal(hangup) is signal.SIG_IGN:
        return
    signal.signal(hangup, _as_termination)


def _as_termination(signum: int, frame) -> None:
    handler = signal.getsignal(signal.SIGTERM)
    if callable(handler):
        handler(signum, frame)  # Prefect's raises TerminationSignal(SIGHUP): a crash it records
        return
    if handler is signal.SIG_IGN:
        return
    # No handler: the default action of SIGHUP itself, as without this module.
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
