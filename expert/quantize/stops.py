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
A second stop does not wait for the layer: `StopNow` is raised in the main thread (where
gptqmodel quantizes), which drops the layer in progress and keeps the committed ones, as a kill
would (gptqmodel's commits survive one: tests/expert/test_faults.py), and the first stop is then
passed on as above. Press Ctrl-C twice, as with other tools that stop gracefully first.

    try:
        with StopsDuringGptq() as stops:
            log = model.quantize(..., checkpoint=...)   # returns, or raises CheckpointStopped
    except StopNow:
        ...                                             # a second stop: the layer in progress dropped
    stops.pass_on()   # the stop gptqmodel took, if any, goes to the handler before it
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import threading

from expert.signals import STOPS, forced_exit, held_by_gptqmodel, thread_in_this_context, watcher_fd

_log = logging.getLogger(__name__)

# How long a second stop's StopNow may take to end the block. It lands at the main thread's next
# Python instruction; a main thread blocked on a lock (gptqmodel's workers, whose state an
# exception landing anywhere can leave inconsistent) never runs one: seen once in CI, a hang.
QUIT_AFTER_S = 20.0


class StopNow(BaseException):
    """A second stop during GPTQ, raised in the main thread: quit without finishing the layer.
    A BaseException, so that no `except Exception` on the way swallows it."""


class StopsDuringGptq:
    """Watch the stop signals that arrive in the block (main thread only; elsewhere it sees none)."""

    def __init__(self):
        self.received: list[int] = []
        self._read = self._write = None
        self._previous_fd = -1  # restored on exit: expert.signals' watch, which this one stands in for
        self._watcher: threading.Thread | None = None
        self._ended = threading.Event()  # the block is over: a StopNow reached the main thread, or none was needed

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
        self._ended.set()
        if self._watcher is None:
            return
        try:
            signal.set_wakeup_fd(self._previous_fd)
            os.close(self._write)  # the watcher reads to the end, then stops
            self._write = None
            self._watcher.join(timeout=5)
        finally:  # a StopNow the watcher raised may land here: close all the same
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
                    _raise_in_main_thread(StopNow)
                    thread_in_this_context(self._quit_if_stuck, "gptq-quit", signum).start()

    def _quit_if_stuck(self, signum: int) -> None:
        """End the process as a shell reports that signal (128 + N) if StopNow has not ended the block
        in QUIT_AFTER_S: the layers committed are on disk, and a kill would keep them too."""
        if self._ended.wait(QUIT_AFTER_S):
            return
        forced_exit(signum, f"GPTQ: the main thread did not stop within {QUIT_AFTER_S:.0f} s (blocked, not running "
                            "Python): ending the process now; the layers committed before are kept")

    def _close(self) -> None:
        for fd in (self._read, self._write):
            if fd is not None:
                os.close(fd)
        self._read = self._write = None


def _raise_in_main_thread(error: type[BaseException]) -> None:
    """Raise `error` in the main thread at its next Python instruction (CPython's
    PyThreadState_SetAsyncExc: a signal handler cannot be added there, gptqmodel holds them)."""
    ident = threading.main_thread().ident
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(error))
