"""Ctrl-C (or SIGTERM) on `expert run`: the run stops at once and Prefect records it as stopped.

A terminal's Ctrl-C sends SIGINT to the whole foreground process group, which held Prefect's
temporary server too. The server died with the flow: the run stayed "Running" in the UI, the
stage failed with "Connection refused", and `expert` exited after 150 s with an unexpected
ConnectError (the default pipeline, measured). flows/temporary_server.py starts the server in
a session of its own.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.fixtures.pipeline import tiny_config_dict, tiny_inputs

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.name != "posix", reason="process groups are POSIX")]

EXPERT = str(Path(sys.executable).with_name("expert"))


def _default_sigint():
    # The test runner may itself have been started with SIGINT ignored (a background job), and a
    # child inherits that: give `expert` the default, as a terminal's foreground job has.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, -signal.SIGTERM)],
                         ids=["ctrl-c", "sigterm"])
def test_a_signal_to_the_group_stops_the_run_and_prefect_records_it(sig, code, tmp_path):
    # SIGTERM to the group is what `timeout`, systemd and container stops send; Prefect records the
    # crash, then lets the signal end the process as it would have.
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(tiny_inputs(tmp_path / "inputs"))))
    home = tmp_path / "prefect"
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        run = subprocess.Popen([EXPERT, "run", str(config)], cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                               env={**os.environ, "PREFECT_HOME": str(home)}, start_new_session=True,
                               preexec_fn=_default_sigint)
    try:
        deadline = time.monotonic() + 240
        while "train: building" not in log.read_text():  # mid-run: a stage is computing
            assert run.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        os.killpg(run.pid, sig)  # the whole group, as a terminal's Ctrl-C does
        returned = run.wait(timeout=60)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    text = log.read_text()
    assert returned == code and "ConnectError" not in text, text[-3000:]
    if sig == signal.SIGINT:
        assert "interrupted; completed stages are kept" in text, text[-3000:]
    with sqlite3.connect(home / "prefect.db") as db:  # the run as the UI shows it
        states = db.execute("select state_type from flow_run").fetchall()
    assert states == [("CRASHED",)], states
