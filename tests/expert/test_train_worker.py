"""expert/train/worker.py's exit: a rank's process ends without the interpreter's finalization.

A C++ thread that still wants the GIL while CPython 3.11 finalizes is ended with pthread_exit and
aborts the process (SIGABRT); torchrun then reports a run whose work was done as failed. Here a
module global that aborts when finalized stands in for that thread."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import expert

pytestmark = pytest.mark.skipif(os.name != "posix", reason="os.abort's SIGABRT is POSIX")

RANK = textwrap.dedent("""
    import atexit, os, sys
    from expert.train.worker import run_and_exit

    class AbortsWhenFinalized:
        def __del__(self, abort=os.abort):  # bound now: the module's globals are gone by then
            abort()

    KEPT = AbortsWhenFinalized()  # collected only when the interpreter finalizes

    def entry():
        atexit.register(lambda: print("atexit ran", flush=True))
        print("trained", end="")  # left in the buffer: the exit must flush it
        if sys.argv[1] == "fail":
            raise RuntimeError("rank failed")
        if sys.argv[1] == "exit":
            sys.exit(3)

    if sys.argv[2] == "worker":
        run_and_exit(entry)
    entry()
""")


def rank(outcome: str, exit_by: str) -> subprocess.CompletedProcess:
    root = str(Path(expert.__file__).resolve().parents[1])
    return subprocess.run([sys.executable, "-c", RANK, outcome, exit_by], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": root})


def test_the_stand_in_aborts_a_plain_exit():
    # The premise: without run_and_exit the finalizer runs and the process dies of SIGABRT.
    assert rank("ok", "plain").returncode == -signal.SIGABRT


@pytest.mark.parametrize("outcome, code", [("ok", 0), ("fail", 1), ("exit", 3)])
def test_a_rank_exits_with_its_own_code_after_atexit_and_a_flush(outcome, code):
    done = rank(outcome, "worker")
    assert done.returncode == code, done.stderr
    assert done.stdout == "trainedatexit ran\n"
    assert ("RuntimeError: rank failed" in done.stderr) == (outcome == "fail"), done.stderr
