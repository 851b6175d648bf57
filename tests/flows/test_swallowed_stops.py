"""flows/swallowed_stops.py: a stop whose exception Python drops in a finalizer is sent again.

Each test makes the signal's handler run inside a `__del__`, where CPython prints the exception
as "Exception ignored in ..." and goes on: without the hook, the process carries on unstopped."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest
from prefect.exceptions import TerminationSignal

from flows.swallowed_stops import redeliver_swallowed_stops

pytestmark = pytest.mark.skipif(os.name != "posix", reason="signals sent to oneself are POSIX")


class SignalledWhenCollected:
    """Sends `signum` to this process from its finalizer; the handler then runs right there."""

    def __init__(self, signum: int):
        self.signum = signum

    def __del__(self):
        os.kill(os.getpid(), self.signum)
        for _ in range(100):  # bytecodes: where Python runs the handler, still inside __del__
            pass


@pytest.fixture
def handlers(monkeypatch):
    """Prefect's SIGTERM behaviour during a flow run (raise TerminationSignal) and Python's Ctrl-C,
    counted; everything restored after."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    calls: list[int] = []

    def terminate(signum, frame):
        calls.append(signum)
        raise TerminationSignal(signal=signum)

    def interrupt(signum, frame):
        calls.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, interrupt)  # a runner started in the background may ignore SIGINT
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # restored after the test
    yield calls
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def collect_then_wait(signum: int) -> None:
    SignalledWhenCollected(signum)  # collected at once: the handler runs in its __del__
    time.sleep(5)  # the resent signal ends this well before


@pytest.mark.parametrize("signum, stop", [(signal.SIGTERM, TerminationSignal), (signal.SIGINT, KeyboardInterrupt)],
                         ids=["sigterm", "ctrl-c"])
def test_a_stop_dropped_in_a_finalizer_is_sent_again_and_stops(handlers, signum, stop, capfd):
    redeliver_swallowed_stops()
    installed = sys.unraisablehook
    redeliver_swallowed_stops()  # every flow run calls it: one hook, not one more wrapper per run
    assert sys.unraisablehook is installed
    started = time.monotonic()
    with pytest.raises(stop):
        collect_then_wait(signum)
    assert time.monotonic() - started < 4
    assert handlers == [signum, signum]  # dropped in __del__, then raised in ordinary code
    name = signal.Signals(signum).name
    assert f"{name} arrived while Python ran SignalledWhenCollected.__del__" in capfd.readouterr().err


def test_without_the_hook_the_stop_is_lost(handlers):
    """What the hook is for: Python drops the stop, and the code goes on to its end."""
    sys.unraisablehook = lambda unraisable: None
    SignalledWhenCollected(signal.SIGTERM)
    time.sleep(0.3)
    assert handlers == [signal.SIGTERM]


def test_other_dropped_exceptions_go_to_the_hook_before(handlers):
    seen = []
    sys.unraisablehook = seen.append

    class Failing:
        def __del__(self):
            raise ValueError("not a stop")

    redeliver_swallowed_stops()
    Failing()
    assert [type(u.exc_value) for u in seen] == [ValueError] and handlers == []


def test_both_flows_install_it_first(monkeypatch, tmp_path):
    from expert.errors import ConfigError
    from expert.pipeline_config import load_preset
    from flows import evaluate, pipeline

    class Stop(Exception):
        pass

    def first_step(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(evaluate, "model_folder", first_step)
    for run, failure in ((lambda: evaluate.evaluate_model.fn(model=str(tmp_path)), Stop),
                         (lambda: pipeline.pipeline.fn(config=load_preset(
                             "default", [f"data.pubmedqa.source={tmp_path / 'missing.json'}"])), ConfigError)):
        monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: None)
        with pytest.raises(failure):
            run()
        assert getattr(sys.unraisablehook, "redelivers_stops", False)


FLOW = textwrap.dedent("""
    import os, signal, sys, time
    from prefect import flow, task
    from flows.hangup import stop_on_hangup
    from flows.swallowed_stops import redeliver_swallowed_stops
    from flows.temporary_server import detach_temporary_server
    from tests.flows.test_swallowed_stops import SignalledWhenCollected

    @task
    def stage():
        SignalledWhenCollected(signal.SIGHUP)
        time.sleep(10)
        print("stage went on to its end", flush=True)

    @flow
    def run():
        redeliver_swallowed_stops()
        stage()

    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    detach_temporary_server()  # as `expert run`: the server ends with this process, however it ends
    stop_on_hangup()
    run()
""")


CAUGHT_FLOW = textwrap.dedent("""
    import os, signal, time
    from prefect import flow, task
    from expert import signals
    from flows.swallowed_stops import redeliver_swallowed_stops
    from flows.temporary_server import detach_temporary_server
    from tasks.stage import _ProgressArtifact

    @task
    def stage():
        try:  # as gptqmodel's import-time `except BaseException: pass`
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):
                pass
        except BaseException:
            pass
        time.sleep(signals.GRACE_S + 0.5)
        _ProgressArtifact("stage")(1, 10)  # the stage's next progress point
        print("stage went on to its end", flush=True)

    @flow
    def run():
        redeliver_swallowed_stops()
        stage()

    detach_temporary_server()
    run()
""")


@pytest.mark.slow
@pytest.mark.parametrize("flow", [FLOW, CAUGHT_FLOW], ids=["finalizer", "caught"])
def test_a_dropped_stop_still_crashes_the_flow_run(flow, tmp_path, prefect_home):
    """The whole path: the stop dropped (in __del__, or by an `except BaseException`) -> raised
    again -> Prefect records the crash and the signal ends the process. FLOW's is a hangup, through
    Prefect's SIGTERM handler; CAUGHT_FLOW's a SIGTERM raised again at the stage's next progress."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = str(prefect_home)
    log = tmp_path / "run.log"
    with open(log, "w") as out:  # a file, not a pipe: a server left behind would hold a pipe open
        done = subprocess.run([sys.executable, "-c", flow], cwd=os.getcwd(), env=env, stdout=out,
                              stderr=subprocess.STDOUT, timeout=240)
    text = log.read_text()
    code = -signal.SIGHUP if flow is FLOW else -signal.SIGTERM
    assert done.returncode == code and "stage went on to its end" not in text, text[-3000:]
    with sqlite3.connect(prefect_home / "prefect.db") as db:
        states = db.execute("select state_type from flow_run").fetchall()
    assert states == [("CRASHED",)], states


STUCK_FLOW = textwrap.dedent("""
    from prefect import flow, task
    from flows.swallowed_stops import redeliver_swallowed_stops
    from flows.temporary_server import detach_temporary_server
    from tests.expert.test_quantize_stops import stuck_after_two_stops

    @flow
    def run():
        redeliver_swallowed_stops()
        task(stuck_after_two_stops, name="quantize")()

    detach_temporary_server()
    run()
""")


@pytest.mark.slow
def test_a_process_forced_out_during_gptq_records_its_run_crashed(tmp_path, prefect_home):
    """A second stop during GPTQ ends the process from the watcher thread, past Prefect's handler:
    the run's last words record the crash instead (without them the run and its task stay RUNNING),
    and what the stop watchers said, from their own threads, is in the run's log."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(prefect_home), PREFECT_LOGGING_EXTRA_LOGGERS="expert")  # as `expert run` sets it
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, "-c", STUCK_FLOW], cwd=os.getcwd(), env=env, stdout=out,
                              stderr=subprocess.STDOUT, timeout=240)
    text = log.read_text()
    assert done.returncode == 128 + signal.SIGTERM, text[-3000:]
    assert "without a flow run id" not in text, text[-3000:]  # no watcher's record dropped from the run's log
    with sqlite3.connect(prefect_home / "prefect.db") as db:
        runs = db.execute("select state_type, state_name from flow_run").fetchall()
        tasks = db.execute("select state_type from task_run").fetchall()
        message = db.execute("select message from flow_run_state where type = 'CRASHED'").fetchone()
        said = [row[0] for row in db.execute("select message from log")]
    assert runs == [("CRASHED", "Crashed")] and tasks == [("CRASHED",)], (runs, tasks)
    assert "GPTQ: stopped, its layers committed to WORK_DIR" in message[0], message
    for words in ("GPTQ: SIGTERM: stopping once the layer", "GPTQ: SIGTERM again: quitting now",
                  "GPTQ: stopped, its layers committed to WORK_DIR"):
        assert any(words in line for line in said), (words, said)


def test_nothing_is_sent_again_while_the_interpreter_ends(monkeypatch):
    """At shutdown no thread can start (a RuntimeError inside the hook); the process ends anyway."""
    from flows import swallowed_stops

    started = []
    monkeypatch.setattr(swallowed_stops.threading, "Timer", lambda *args: started.append(args))
    monkeypatch.setattr(sys, "is_finalizing", lambda: True)
    swallowed_stops.resend_soon(signal.SIGTERM)
    assert started == []


def test_the_last_words_record_a_crash_or_the_cancel_that_was_asked_for(prefect_harness):
    """What record_forced_end leaves in Prefect for a running run, one being cancelled, and one over."""
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling, Completed, Running

    from flows.swallowed_stops import record_forced_end

    @flow
    def quantizing():
        pass

    @task
    def quantize():
        pass

    with get_client(sync_client=True) as client:
        for before, after in ((Running(), "CRASHED"), (Cancelling(), "CANCELLED"), (Completed(), "COMPLETED")):
            run = client.create_flow_run(quantizing, state=Running())
            task_run = client.create_task_run(quantize, flow_run_id=run.id, dynamic_key="0", state=Running())
            client.set_flow_run_state(run.id, before, force=True)
            record_forced_end(run.id, "GPTQ: stopped, its layers committed")
            state = client.read_flow_run(run.id).state
            assert state.type.value == after, (before, state)
            task_state = client.read_task_run(task_run.id).state
            if after == "COMPLETED":  # over before the words: nothing touched
                assert task_state.type.value == "RUNNING" and "GPTQ: stopped" not in (state.message or "")
            else:
                assert "GPTQ: stopped" in state.message and task_state.type.value == "CRASHED", (state, task_state)
                assert "GPTQ: stopped" in task_state.message
            # Then the process exits non-zero, and a worker proposes Crashed for its run as
            # BaseWorker._propose_crashed_state does: the server refuses it for a run that has ended,
            # so a cancel stays Cancelled in the UI.
            assert not worker_reports_crash(run.id)
            assert client.read_flow_run(run.id).state.type.value == after


def worker_reports_crash(flow_run_id) -> bool:
    """A worker's proposal after a non-zero exit (prefect.workers.base): whether it was taken."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.exceptions import Abort
    from prefect.states import Crashed
    from prefect.utilities.engine import propose_state

    async def propose() -> bool:
        async with get_client() as client:
            try:
                state = await propose_state(client, Crashed(message="Flow run infrastructure exited with non-zero "
                                                                    "status code 1."), flow_run_id=flow_run_id)
            except Abort:
                return False
            return state.is_crashed() and "non-zero" in (state.message or "")

    return asyncio.run(propose())
