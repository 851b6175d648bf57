"""flows/hangup.py: SIGHUP goes where SIGTERM goes, and `nohup` still means no hangup.
(The whole `expert run` under a hangup: tests/flows/test_interrupt.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from flows.hangup import stop_on_hangup

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="SIGHUP is POSIX")


@pytest.fixture
def saved_handlers():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGHUP, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


class Stopped(Exception):
    pass


def test_a_hangup_reaches_the_termination_handler_of_the_moment(saved_handlers):
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    stop_on_hangup()
    got = []

    def terminate(signum, frame):  # as Prefect's handler does during a flow run: raise
        got.append(signum)
        raise Stopped

    signal.signal(signal.SIGTERM, terminate)  # installed after: the handler at signal time counts
    with pytest.raises(Stopped):
        os.kill(os.getpid(), signal.SIGHUP)
        signal.sigtimedwait([], 0.5)  # (delivery is asynchronous: give it its moment)
    assert got == [signal.SIGHUP]


def test_nohup_is_respected(saved_handlers):
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    stop_on_hangup()
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN


@pytest.mark.parametrize("sigterm, code", [("signal.SIG_DFL", -signal.SIGHUP), ("signal.SIG_IGN", 0)],
                         ids=["default", "ignored"])
def test_without_a_termination_handler_a_hangup_does_what_sigterm_would(sigterm, code):
    script = ("import os, signal, time\n"
              "from flows.hangup import stop_on_hangup\n"
              f"signal.signal(signal.SIGHUP, signal.SIG_DFL); stop_on_hangup(); signal.signal(signal.SIGTERM, {sigterm})\n"
              "os.kill(os.getpid(), signal.SIGHUP); time.sleep(0.5)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=os.getcwd(), timeout=60)
    assert done.returncode == code
