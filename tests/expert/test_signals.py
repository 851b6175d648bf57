"""expert/signals.py: a stop whose exception library code caught is raised again at a progress point.

The end-to-end case (a Prefect flow run recorded as crashed) is tests/flows/test_swallowed_stops.py's."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from expert import signals

pytestmark = pytest.mark.skipif(os.name != "posix", reason="signals sent to oneself are POSIX")


class Stopped(BaseException):
    pass


@pytest.fixture
def sigterm_raises(monkeypatch):
    """SIGTERM's handler raises, as Prefect's does during a flow run; its calls counted. A short grace."""
    calls: list[int] = []

    def handler(signum, frame):
        calls.append(signum)
        raise Stopped

    saved = signal.signal(signal.SIGTERM, handler)
    monkeypatch.setattr(signals, "GRACE_S", 0.3)
    yield calls, handler
    signal.signal(signal.SIGTERM, saved)
    signals.stop_watching()


def swallowed(signum: int = signal.SIGTERM) -> None:
    """A stop whose exception library code catches, as gptqmodel's `except BaseException: pass` does."""
    try:
        os.kill(os.getpid(), signum)
        for _ in range(1000):  # bytecodes: the handler runs here, inside the try
            pass
    except BaseException:  # noqa: BLE001 - the library's
        pass


def swallowed_then_late() -> None:
    """`swallowed`, then past the grace: the next progress point must raise it again."""
    swallowed()
    time.sleep(0.4)


def test_a_swallowed_stop_is_raised_again_once_after_the_grace(sigterm_raises, caplog):
    calls, _ = sigterm_raises
    assert signals.watch_stops()
    swallowed()
    assert calls == [signal.SIGTERM]
    signals.raise_swallowed_stop()  # within the grace: its exception may still be on its way
    time.sleep(0.4)
    with caplog.at_level("WARNING", logger="expert.signals"), pytest.raises(Stopped):
        signals.raise_swallowed_stop()
    assert calls == [signal.SIGTERM, signal.SIGTERM]
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith("SIGTERM arrived ") and message.endswith("raising it again"), message
    signals.raise_swallowed_stop()  # raised once, not at every point after
    assert calls == [signal.SIGTERM, signal.SIGTERM]


def test_without_the_watch_the_stop_is_lost(sigterm_raises):
    """What the watch is for: nothing else keeps a trace of it."""
    calls, _ = sigterm_raises
    swallowed_then_late()
    signals.raise_swallowed_stop()
    assert calls == [signal.SIGTERM]


def test_a_new_watch_forgets_the_stops_before(sigterm_raises):
    calls, _ = sigterm_raises
    assert signals.watch_stops()
    swallowed()
    time.sleep(0.2)  # noted by the reader thread
    fd = signals.watcher_fd()
    assert signals.watch_stops() and signals.watcher_fd() == fd  # the same pipe, its reader kept
    time.sleep(0.4)
    signals.raise_swallowed_stop()
    assert calls == [signal.SIGTERM]


def test_a_stop_held_by_gptqmodel_or_now_ignored_is_left_alone(sigterm_raises):
    calls, handler = sigterm_raises
    assert signals.watch_stops()
    swallowed_then_late()
    handler.__module__ = "gptqmodel.looper.gptq_checkpoint"  # it commits the layer, then stops
    signals.raise_swallowed_stop()
    handler.__module__ = __name__
    swallowed_then_late()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signals.raise_swallowed_stop()
    assert calls == [signal.SIGTERM, signal.SIGTERM]


def test_off_the_main_thread_nothing_is_raised(sigterm_raises):
    calls, _ = sigterm_raises
    assert signals.watch_stops()
    swallowed_then_late()
    errors = []

    def check():
        try:
            signals.raise_swallowed_stop()
        except BaseException as exc:  # noqa: BLE001 - reported to the test below
            errors.append(exc)

    thread = threading.Thread(target=check)
    thread.start()
    thread.join()
    assert errors == [] and calls == [signal.SIGTERM]
    with pytest.raises(Stopped):  # still waiting for the main thread
        signals.raise_swallowed_stop()


def test_a_wakeup_fd_someone_else_set_is_left_theirs(sigterm_raises):
    read, write = os.pipe()
    os.set_blocking(write, False)
    signal.set_wakeup_fd(write)
    try:
        assert not signals.watch_stops()
        signals.stop_watching()
        assert signal.set_wakeup_fd(write) == write
    finally:
        signal.set_wakeup_fd(-1)
        os.close(read), os.close(write)


def test_stop_watching_frees_the_wakeup_fd_and_ends_the_reader(sigterm_raises):
    assert signals.watch_stops()
    signals.stop_watching()
    assert signal.set_wakeup_fd(-1) == -1 and signals.watcher_fd() == -1
    deadline = time.monotonic() + 5
    while any(t.name == "stop-signals" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the reader outlived its pipe"
        time.sleep(0.05)


FORCED = """
import logging, sys, time
from expert import signals
signals.LAST_WORDS_S = 0.5
logging.basicConfig(level=logging.INFO, format="%(message)s")
def words(reason):
    print("last words:", reason, flush=True)
    if sys.argv[1] == "hangs":
        time.sleep(60)
    if sys.argv[1] == "fails":
        raise OSError("the server is gone")
signals.set_last_words(words)
try:
    signals.forced_exit(15, "stuck")
finally:
    print("never: no exception, no finally", flush=True)
"""


@pytest.mark.parametrize("words", ["said", "hangs", "fails"])
def test_a_forced_exit_says_the_last_words_then_ends_as_the_signal(words):
    """The words run first (the flows record the run as crashed there); ones that hang or fail
    cost at most LAST_WORDS_S and never keep the process from ending as 128 + the signal."""
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", FORCED, words], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": root})
    out = done.stdout + done.stderr
    assert done.returncode == 128 + 15 and time.monotonic() - started < 30, out
    assert "stuck" in done.stderr and "last words: stuck" in done.stdout and "never" not in out, out
    assert ("took over 0.5 s: exiting without them" in out) == (words == "hangs"), out
    assert ("OSError: the server is gone" in out) == (words == "fails"), out


def test_threads_it_starts_see_the_context_of_the_thread_that_started_them():
    """A watcher thread's log records belong to the run that started it (Prefect reads the run from
    context variables, which a plain thread starts without)."""
    import contextvars

    run = contextvars.ContextVar("run", default=None)
    run.set("flow run 1")
    seen = []
    thread = signals.thread_in_this_context(lambda suffix: seen.append(f"{run.get()}{suffix}"), "t", "!")
    thread.start()
    thread.join()
    assert seen == ["flow run 1!"] and thread.daemon
