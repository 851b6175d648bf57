"""expert/quantize/stops.py on its own (with gptqmodel: test_faults.py's stop during GPTQ)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from expert.quantize.stops import StopsDuringGptq

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
    in gptqmodel's pool, where an exception raised into it had landed): run in a child process."""
    from expert.quantize import stops

    def held(signum, frame):  # gptqmodel's handler: it only notes the stop
        pass

    held.__module__ = "gptqmodel.looper.gptq_checkpoint"
    signal.signal(signal.SIGTERM, held)
    with stops.StopsDuringGptq("WORK_DIR"):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)
        print("the first stop is held: the work goes on", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        lock = threading.Lock()
        lock.acquire()
        lock.acquire()
    print("never: the block does not end", flush=True)


STUCK = "from tests.expert.test_quantize_stops import stuck_after_two_stops; stuck_after_two_stops()"


def test_a_second_stop_ends_the_process_at_once_whatever_the_main_thread_does():
    """gptqmodel's handler only sets a flag, read once the layer in progress is committed (tens of
    seconds on a large model): a second stop does not wait for it, nor for a main thread blocked on
    a lock; the process ends as a shell reports the signal."""
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", STUCK], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": root})
    assert done.returncode == 128 + signal.SIGTERM and time.monotonic() - started < 60, done.stderr[-3000:]
    assert "the work goes on" in done.stdout and "never" not in done.stdout, done.stdout
    said = [line for line in done.stderr.splitlines() if "GPTQ" in line]
    assert len(said) == 3 and "Stop again to quit now" in said[0], said
    assert "GPTQ: SIGTERM again: quitting now; the layer in progress is dropped" in said[1], said
    assert "GPTQ: stopped, its layers committed to WORK_DIR; the same command continues after them" in said[2], said
