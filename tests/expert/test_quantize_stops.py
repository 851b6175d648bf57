"""expert/quantize/stops.py on its own (with gptqmodel: test_faults.py's stop during GPTQ)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from expert.quantize.stops import StopNow, StopsDuringGptq

pytestmark = pytest.mark.skipif(os.name != "posix", reason="signals sent to oneself are POSIX")


class Stopped(Exception):
    pass


@pytest.fixture
def sigterm_counted():
    """SIGTERM handled in Python and counted: like gptqmodel's handler it returns, and like
    Prefect's it raises once `handler.stops` is set."""
    calls: list[int] = []

    def handler(signum, frame):
        calls.append(signum)
        if getattr(handler, "stops", False):  # the handler a stop is passed on to
            raise Stopped

    saved = signal.signal(signal.SIGTERM, handler)
    yield calls, handler
    signal.signal(signal.SIGTERM, saved)


def test_stops_are_seen_said_once_and_passed_on(sigterm_counted, caplog):
    calls, handler = sigterm_counted
    # first as gptqmodel's own handler: the stop is said
    with caplog.at_level("WARNING", logger="expert.quantize.stops"), StopsDuringGptq() as stops:
        for module in ("gptqmodel.looper.gptq_checkpoint", __name__):  # then gptqmodel puts the handler back
            handler.__module__ = module
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # the watcher thread reads it
    assert stops.received == [signal.SIGTERM, signal.SIGTERM]
    assert [r.getMessage()[:63] for r in caplog.records] == ["GPTQ: SIGTERM: stopping once the layer in "
                                                              "progress is committed"]
    assert signal.set_wakeup_fd(-1) == -1  # put back as it was
    handler.stops = True
    with pytest.raises(Stopped):
        stops.pass_on()
    assert calls == [signal.SIGTERM] * 3


def test_a_second_stop_raises_stop_now_in_the_main_thread(sigterm_counted, caplog):
    # gptqmodel's handler only sets a flag, read once the layer in progress is committed (tens of
    # seconds on a large model): a second stop must not wait for it.
    calls, handler = sigterm_counted
    handler.__module__ = "gptqmodel.looper.gptq_checkpoint"
    stops, reached = StopsDuringGptq(), []
    with caplog.at_level("WARNING", logger="expert.quantize.stops"), pytest.raises(StopNow):
        with stops:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            reached.append("first stop taken, work goes on")
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100):  # the layer's work, in Python: interrupted at its next instruction
                time.sleep(0.05)
            reached.append("the layer's end")
    assert reached == ["first stop taken, work goes on"]
    assert stops.received == [signal.SIGTERM, signal.SIGTERM] and calls == [signal.SIGTERM] * 2
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "Stop again to quit now" in messages[0], messages
    assert messages[1].startswith("GPTQ: SIGTERM again: quitting now; the layer in progress is dropped")
    assert signal.set_wakeup_fd(-1) == -1  # put back as it was
    handler.stops = True
    with pytest.raises(Stopped):
        stops.pass_on()


def test_a_stop_another_handler_holds_is_not_said(sigterm_counted, caplog):
    with caplog.at_level("WARNING", logger="expert.quantize.stops"), StopsDuringGptq() as stops:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
    assert stops.received == [signal.SIGTERM] and caplog.records == []


def test_nothing_received_passes_nothing_on(sigterm_counted):
    with StopsDuringGptq() as stops:
        pass
    stops.pass_on()
    assert stops.received == [] and sigterm_counted[0] == []


def test_a_wakeup_fd_someone_else_set_is_left_theirs(sigterm_counted):
    read, write = os.pipe()
    os.set_blocking(write, False)
    signal.set_wakeup_fd(write)
    try:
        with StopsDuringGptq() as stops:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
        assert signal.set_wakeup_fd(-1) == write and os.read(read, 8) == bytes([signal.SIGTERM])
        assert stops.received == []
    finally:
        signal.set_wakeup_fd(-1)
        os.close(read), os.close(write)


def test_off_the_main_thread_it_sees_nothing_and_does_no_harm():
    errors = []

    def run():
        try:
            with StopsDuringGptq() as stops:
                pass
            stops.pass_on()
        except BaseException as exc:  # noqa: BLE001 - reported to the test below
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert errors == []


def test_where_a_pipe_cannot_be_the_wakeup_fd_it_watches_nothing(monkeypatch):
    """Windows takes only sockets there: GPTQ runs as before, with gptqmodel's own stop."""
    def refuse(fd, **kwargs):
        raise ValueError("the fd is not a socket")

    monkeypatch.setattr(signal, "set_wakeup_fd", refuse)
    open_before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    with StopsDuringGptq() as stops:
        pass
    stops.pass_on()
    assert stops.received == []
    if open_before is not None:
        assert len(os.listdir("/proc/self/fd")) == open_before  # the pipe was closed


def test_it_stands_in_for_the_runs_watch_and_gives_it_back(sigterm_counted):
    """A flow run watches the stops (expert.signals); GPTQ's watch takes the wakeup fd over meanwhile."""
    from expert import signals

    assert signals.watch_stops()
    try:
        with StopsDuringGptq() as stops:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
        assert stops.received == [signal.SIGTERM]
        assert signal.set_wakeup_fd(signals.watcher_fd()) == signals.watcher_fd()  # the run's watch again
    finally:
        signals.stop_watching()


def stuck_after_two_stops() -> None:
    """Two SIGTERMs that gptqmodel's handler holds, then the main thread blocked for good (as once
    in gptqmodel's pool): StopNow never lands. Run in a child process; QUIT_AFTER_S set to 1 s."""
    from expert.quantize import stops

    stops.QUIT_AFTER_S = 1.0

    def held(signum, frame):  # gptqmodel's handler: it only notes the stop
        pass

    held.__module__ = "gptqmodel.looper.gptq_checkpoint"
    signal.signal(signal.SIGTERM, held)
    with stops.StopsDuringGptq():
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        lock = threading.Lock()
        lock.acquire()
        lock.acquire()


STUCK = "from tests.expert.test_quantize_stops import stuck_after_two_stops; stuck_after_two_stops()"


def test_a_second_stop_ends_a_main_thread_that_stays_blocked():
    """StopNow lands at the main thread's next instruction; one blocked on a lock runs none (seen
    once in CI, in gptqmodel's thread pool): the process ends as a shell reports the signal."""
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    done = subprocess.run([sys.executable, "-c", STUCK], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": root})
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-3000:]
    assert "did not stop within 1 s" in done.stderr, done.stderr[-3000:]
