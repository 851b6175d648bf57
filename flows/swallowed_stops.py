"""A stop signal that lands in a finalizer is sent again, not lost.

Python runs a signal's handler in the main thread at its next bytecode, whatever runs there. When
that is a `__del__`, a weakref callback or a generator closed by the garbage collector (loading a
model runs many: gptqmodel's "gc.collect() reclaimed 495 objects in 0.372s"), the exception the
handler raises (Prefect's TerminationSignal for SIGTERM, and for SIGHUP through flows/hangup.py;
KeyboardInterrupt for Ctrl-C) is printed as "Exception ignored in ..." and dropped: the run went on
to the end as if it had never been signalled (seen once in CI, in tests/flows/test_interrupt.py).
CPython hands every such dropped exception to `sys.unraisablehook`; the hook installed here sends
the signal again a moment later from a helper thread, so that its handler runs in ordinary code.
A stop dropped without a trace (caught by a library's `except BaseException`) is expert.signals'
to raise again, at the run's next progress point: the flows start its watch here too.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

from expert.signals import watch_stops

RESEND_AFTER_S = 0.05  # long enough for the hook and the finalizer to return first


def redeliver_swallowed_stops() -> None:
    """Watch the stops from now on (expert.signals, a fresh watch per run) and install the hook
    (once per process; any other unraisable exception goes to the hook before it)."""
    watch_stops()
    if getattr(sys.unraisablehook, "redelivers_stops", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        signum = stop_signal(unraisable.exc_value)
        if signum is None:
            previous(unraisable)
            return
        try:
            where = getattr(unraisable.object, "__qualname__", None) or type(unraisable.object).__name__
            print(f"{signal.Signals(signum).name} arrived while Python ran {where}, where it is dropped: "
                  "sending it again", file=sys.stderr)
        except BaseException as exc:  # a second stop landed in this very hook: resend that one
            signum = stop_signal(exc) or signum
        resend_soon(signum)

    hook.redelivers_stops = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def stop_signal(exc: BaseException | None) -> int | None:
    """The signal behind a stop exception: Prefect's TerminationSignal carries it, Ctrl-C's is SIGINT."""
    from prefect.exceptions import TerminationSignal

    if isinstance(exc, TerminationSignal):
        return int(exc.signal)
    if isinstance(exc, KeyboardInterrupt):
        return int(signal.SIGINT)
    return None


def resend_soon(signum: int) -> None:
    if sys.is_finalizing():  # the process is ending already (and can start no thread)
        return
    timer = threading.Timer(RESEND_AFTER_S, os.kill, (os.getpid(), signum))
    timer.daemon = True  # a process that ends first has nothing left to stop
    timer.start()
