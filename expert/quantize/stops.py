"""A Ctrl-C or SIGTERM during GPTQ with layer checkpoints: said at once, passed on once the layer
in progress is committed.

While gptqmodel keeps layer checkpoints (checkpoint.py) it takes SIGINT and SIGTERM (and so a
hangup, see flows/hangup.py) for itself: a stop commits the layer in progress, then ends
`quantize` with CheckpointStopped, a RuntimeError. Before this module the pipeline saw a failure
("unexpected CheckpointStopped", Failed in the Prefect UI) rather than the Ctrl-C or SIGTERM it
was, and said nothing until the layer was done (tens of seconds a layer for a 33B model). Here the
signals are read from Python's wakeup fd, which gets each one whoever handles it: the first stop
is said at once, and once gptqmodel has put the handlers before it back, it is raised again, so a
Ctrl-C ends as an interrupt and a SIGTERM as a termination (which Prefect records as a crash).
A second stop does not wait for the layer: the process ends at once, from the watcher thread
(expert.signals.forced_exit: the run recorded as crashed first, then exit 128 + the signal's
number, as a shell reports it), which drops the layer in progress and keeps the committed ones,
as a kill would (gptqmodel's commits survive one: tests/expert/test_faults.py). Press Ctrl-C
twice, as with other tools that stop gracefully first. It used to raise an exception in the main
thread instead (CPython's PyThreadState_SetAsyncExc); one landing inside gptqmodel's thread-pool
locking left the process blocked for good, twice in CI.

    with StopsDuringGptq(work_dir) as stops:
        try:
            log = model.quantize(..., checkpoint=...)   # returns, or raises CheckpointStopped
        except CheckpointStopped:
            ...                                         # a stop gptqmodel took: the layer committed
    stops.pass_on()   # the stop gptqmodel took, if any, goes to the handler before it
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

from expert.signals import STOPS, forced_exit, held_by_gptqmodel, thread_in_this_context, watcher_fd

_log = logging.getLogger(__name__)

STOPPED = "GPTQ: stopped, its layers committed to {}; the same command continues after them"  # either way out


class StopsDuringGptq:
    """Watch the stop signals that arrive in the block (main thread only; elsewhere it sees none)."""

    def __init__(self, work_dir: Path | str | None = None):
        self.work_dir = work_dir  # where the committed layers are: said as the process ends
        self.received: list[int] = []
        self._read = self._write = None
        self._previous_fd = -1  # restored on exit: expert.signals' watch, which this one stands in for
        self._watcher: threading.Thread | None = None

    def __enter__(self) -> StopsDuringGptq:
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)  # the C signal handler must never block on it
        try:
            self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        except ValueError:  # not the main thread, or Windows (sockets only): no watching there
            self._close()
            return self
        if self._previous_fd not in (-1, watcher_fd()):  # someone else's (an asyncio loop's): leave it theirs
            signal.set_wakeup_fd(self._previous_fd)
            self._close()
            return self
        self._watcher = thread_in_this_context(self._watch, "gptq-stops")  # its warnings go to the run's log
        self._watcher.start()
        return self

    def __exit__(self, *exc_info) -> None:
        if self._watcher is None:
            return
        try:
            signal.set_wakeup_fd(self._previous_fd)
            os.close(self._write)  # the watcher reads to the end, then stops
            self._write = None
            self._watcher.join(timeout=5)
        finally:
            self._close()

    def pass_on(self) -> None:
        """Raise the first stop again, now that gptqmodel's handlers are gone: the handler before
        them stops the process (Python's raises KeyboardInterrupt, Prefect's TerminationSignal, the
        default ends it). Nothing happens if none came, or if that signal was ignored before."""
        if self.received:
            signal.raise_signal(self.received[0])  # this thread: its handler runs before this returns

    def _watch(self) -> None:
        while chunk := os.read(self._read, 64):
            for signum in chunk:
                if signum not in STOPS:
                    continue
                self.received.append(signum)
                if not held_by_gptqmodel(signum):  # its handler stops the process now
                    continue
                name = signal.Signals(signum).name
                if len(self.received) == 1:
                    _log.warning("GPTQ: %s: stopping once the layer in progress is committed (on a large model, up "
                                 "to a layer's time); the same command then continues after it. Stop again to "
                                 "quit now, without that layer", name)
                elif len(self.received) == 2:
                    _log.warning("GPTQ: %s again: quitting now; the layer in progress is dropped, the layers "
                                 "committed before it are kept", name)
                    forced_exit(signum, STOPPED.format(self.work_dir))

    def _close(self) -> None:
        for fd in (self._read, self._write):
            if fd is not None:
                os.close(fd)
        self._read = self._write = None
