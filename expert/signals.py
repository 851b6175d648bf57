"""The stop signals (Ctrl-C, SIGTERM, SIGHUP) this process received, so that one whose exception
library code swallowed can be raised again.

Python runs a signal's handler in the main thread at its next bytecode, and the exception it raises
(KeyboardInterrupt, Prefect's TerminationSignal) goes wherever that bytecode is. Where that is a
`try: ... except BaseException: pass` in a library (gptqmodel has some at import time), or Python
code that C code calls and whose errors it clears, the stop is gone without a trace: the run went
on to its end (seen once in CI, tests/flows/test_interrupt.py; a stop dropped in a finalizer is
flows/swallowed_stops.py's). Python's wakeup fd gets a byte for every signal whoever handles it;
a thread reads them here. A stop still unacted on GRACE_S later, when the run reaches one of its
own points (a stage's progress, tasks/stage.py), is raised again there, in ordinary code.

    watch_stops()            # main thread, once a run starts (forgets stops noted before)
    ...
    raise_swallowed_stop()   # at a progress point: raises, through the signal's handler, a lost stop

A stop whose handler is gptqmodel's is being held on purpose until the layer in progress is
committed (expert/quantize/stops.py, which takes the wakeup fd over meanwhile): never raised here.

Where a stop must end the process at once, whatever the main thread is doing (a second stop
during GPTQ: expert/quantize/stops.py), `forced_exit` ends it, after the run's last words
(`set_last_words`: the flows record the run as crashed, which Prefect's own handler would have
done) have had LAST_WORDS_S to be said.
"""

from __future__ import annotations

import contextvars
import logging
import os
import signal
import threading
import time
from typing import Callable, NoReturn

STOPS = frozenset(int(s) for s in (getattr(signal, name, None) for name in ("SIGINT", "SIGTERM", "SIGHUP")) if s)
GRACE_S = 1.0  # a handler runs within microseconds of its signal; its exception is on its way well before
LAST_WORDS_S = 15.0  # a request or two to the run's server: enough unless that server is gone too

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_received: list[tuple[int, float]] = []  # (signal, time.monotonic()) not yet raised again
_write_fd = -1
_watch = 0  # which watch a reader thread serves: a byte read after its watch ended is no run's
_last_words: Callable[[str], None] | None = None


def watch_stops() -> bool:
    """Note the stop signals from now on, forgetting those noted before (a new run). False where
    it cannot: not the main thread, or the wakeup fd is someone else's (an asyncio loop's)."""
    global _write_fd, _watch
    forget_stops()
    try:
        current = signal.set_wakeup_fd(-1)
    except ValueError:  # not the main thread
        return False
    if current != -1 and current == _write_fd:
        signal.set_wakeup_fd(current)
        return True
    if current != -1:  # someone else's: leave it theirs
        signal.set_wakeup_fd(current)
        return False
    read, write = os.pipe()
    os.set_blocking(write, False)  # the C signal handler must never block on it
    signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    with _lock:
        _write_fd, _watch = write, _watch + 1  # a watch someone else cleared keeps its pipe and reader: idle, rare
    threading.Thread(target=_read, args=(read, _watch), name="stop-signals", daemon=True).start()
    return True


def stop_watching() -> None:
    """End the watch (main thread): the wakeup fd back to none, the reader gone. A no-op when the
    wakeup fd is not this module's."""
    global _write_fd, _watch
    forget_stops()
    try:
        current = signal.set_wakeup_fd(-1)
    except ValueError:
        return
    if current != _write_fd or current == -1:
        signal.set_wakeup_fd(current)
        return
    with _lock:
        os.close(_write_fd)  # the reader reads to the end, closes its end and stops
        _write_fd, _watch = -1, _watch + 1


def forget_stops() -> None:
    """Forget the stops noted so far (a run that caught one by design goes on, as a test does)."""
    with _lock:
        _received.clear()


def watcher_fd() -> int:
    """The wakeup fd this module set (-1 if none): expert/quantize/stops.py may take it over."""
    return _write_fd


def raise_swallowed_stop() -> None:
    """Raise again, through its handler of the moment, the first stop received over GRACE_S ago
    (main thread only; a no-op elsewhere, or when none is waiting)."""
    if _write_fd == -1 or threading.current_thread() is not threading.main_thread():
        return
    now = time.monotonic()
    with _lock:
        late = [entry for entry in _received if now - entry[1] >= GRACE_S]
        for entry in late:
            _received.remove(entry)
    for signum, at in late:
        if not callable(signal.getsignal(signum)) or held_by_gptqmodel(signum):
            continue  # no Python handler now (ignored by choice, or the run that got it is over), or held on purpose
        _log.warning("%s arrived %.1f s ago and was swallowed on its way (library code caught its exception): "
                     "raising it again", signal.Signals(signum).name, now - at)
        signal.raise_signal(signum)  # its handler runs now, in this frame, and raises


def held_by_gptqmodel(signum: int) -> bool:
    """gptqmodel's handler holds SIGINT or SIGTERM while it keeps layer checkpoints (a hangup goes
    where SIGTERM goes, flows/hangup.py)."""
    handler = signal.getsignal(signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)
    return getattr(handler, "__module__", "").startswith("gptqmodel")


def _read(fd: int, watch: int) -> None:
    while chunk := os.read(fd, 64):
        noted = [(signum, time.monotonic()) for signum in chunk if signum in STOPS]
        with _lock:
            if noted and _watch == watch:
                _received.extend(noted)
    os.close(fd)


def set_last_words(words: Callable[[str], None] | None) -> None:
    """What `forced_exit` calls, with its reason, before it ends the process (None: nothing)."""
    global _last_words
    _last_words = words


def forced_exit(signum: int, reason: str) -> NoReturn:
    """End the process now, as a shell reports that signal (exit 128 + N), from any thread: the
    last words first (on a thread of their own, given LAST_WORDS_S), then the log handlers flushed.
    No exception, no atexit: nothing waits on a main thread that may be blocked."""
    _log.warning("%s", reason)
    words = _last_words
    if words is not None:
        def say() -> None:
            try:
                words(reason)
            except Exception:  # noqa: BLE001 - the exit must still happen; say why the words failed
                _log.exception("could not record the forced exit")

        speaker = thread_in_this_context(say, "last-words")
        speaker.start()
        speaker.join(LAST_WORDS_S)
        if speaker.is_alive():
            _log.warning("the run's last words took over %g s: exiting without them", LAST_WORDS_S)
    logging.shutdown()
    os._exit(128 + signum)


def thread_in_this_context(target: Callable[..., object], name: str, *args) -> threading.Thread:
    """A daemon thread that runs `target` in a copy of the caller's context variables. A plain
    thread starts with none: its log records then carry no run (Prefect's handler drops them from
    the run's log in the UI, with a UserWarning), although they are about that run."""
    return threading.Thread(target=contextvars.copy_context().run, args=(target, *args), name=name, daemon=True)
