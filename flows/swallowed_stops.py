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

A second stop during GPTQ ends the process at once through expert.signals.forced_exit, past
Prefect's handler, which would have recorded the crash: the run and its task would stay "Running"
in the UI for good, as after a kill. The run's last words, set here, record it as crashed (or
cancelled, if a cancel sent the stop), with the reason, before the process goes.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from functools import partial
from typing import Any
from uuid import UUID

from expert.signals import set_last_words, watch_stops

RESEND_AFTER_S = 0.05  # long enough for the hook and the finalizer to return first


def redeliver_swallowed_stops() -> None:
    """Watch the stops from now on (expert.signals, a fresh watch per run), set the run's last
    words, and install the hook (once per process; any other unraisable exception goes to the hook
    before it)."""
    watch_stops()
    record_crash_on_forced_exit()
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


def record_crash_on_forced_exit() -> None:
    """The current flow run's last words (expert.signals.set_last_words): `record_forced_end`."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    run = context.flow_run if context else None
    set_last_words(partial(record_forced_end, run.id) if run else None)


def record_forced_end(flow_run_id: UUID, reason: str) -> None:
    """Record the flow run as Prefect's SIGTERM handler would have: Cancelled if a cancel (UI, CLI)
    sent the stop, otherwise Crashed; its running task runs Crashed. All with `reason`. A run that
    has ended already (the words outlive it in a long-lived process) is left as it is."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterState,
                                                TaskRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelled, Crashed

    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run_id).state
        if state is not None and state.is_final():
            return
        running = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            task_run_filter=TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(any_=[StateType.RUNNING]))))
        for task_run in running:
            client.set_task_run_state(task_run.id, Crashed(message=reason), force=True)
        cancelled = state is not None and state.type == StateType.CANCELLING
        end = Cancelled(message=f"Flow run was cancelled. {reason}") if cancelled else Crashed(message=reason)
        client.set_flow_run_state(flow_run_id, end, force=True)
