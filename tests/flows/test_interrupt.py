"""Ctrl-C (or SIGTERM) on `expert run`: the run stops at once and Prefect records it as stopped.

A terminal's Ctrl-C sends SIGINT to the whole foreground process group, which held Prefect's
temporary server too. The server died with the flow: the run stayed "Running" in the UI, the
stage failed with "Connection refused", and `expert` exited after 150 s with an unexpected
ConnectError (the default pipeline, measured). flows/temporary_server.py starts the server in
a session of its own.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from tests.fixtures.pipeline import tiny_config_dict, tiny_inputs

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.name != "posix", reason="process groups are POSIX")]

EXPERT = str(Path(sys.executable).with_name("expert"))


def _default_signals():
    # The test runner may itself have been started with SIGINT ignored (a background job) or
    # SIGHUP ignored (under nohup), and a child inherits that: give `expert` the defaults, as a
    # terminal's foreground job has.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def _launch(tmp_path: Path, home: Path, expert: list[str]) -> tuple[subprocess.Popen, Path]:
    """`expert run` of the tiny preset (started by the command `expert`) in a session of its own,
    as a terminal's foreground job, with Prefect's state in `home`; its log file."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(tiny_inputs(tmp_path / "inputs"))))
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        run = subprocess.Popen([*expert, "run", str(config)], cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                               env={**os.environ, "PREFECT_HOME": str(home)}, start_new_session=True,
                               preexec_fn=_default_signals)
    return run, log


def _start(tmp_path: Path, home: Path) -> tuple[subprocess.Popen, Path]:
    """`_launch`, returned once a stage is computing."""
    run, log = _launch(tmp_path, home, [EXPERT])
    deadline = time.monotonic() + 240
    while "train: building" not in log.read_text():  # mid-run: a stage is computing
        if run.poll() is not None or time.monotonic() > deadline:
            _stop(run)
            pytest.fail(log.read_text()[-3000:])
        time.sleep(0.2)
    return run, log


def _stop(run: subprocess.Popen, servers: list[int] = ()) -> None:
    """Whatever is left when a check failed: the run's group, and the server out of it."""
    if run.poll() is None:
        os.killpg(run.pid, signal.SIGKILL)
    for pid in servers:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, -signal.SIGTERM),
                                       (signal.SIGHUP, -signal.SIGHUP)], ids=["ctrl-c", "sigterm", "hangup"])
def test_a_signal_to_the_group_stops_the_run_and_prefect_records_it(sig, code, tmp_path, prefect_home):
    # SIGTERM to the group is what `timeout`, systemd and container stops send, SIGHUP what a closed
    # terminal sends (flows/hangup.py); Prefect records the crash, then lets the signal end the
    # process as it would have.
    run, log = _start(tmp_path, prefect_home)
    servers = _servers_of(run)
    try:
        os.killpg(run.pid, sig)  # the whole group, as a terminal's Ctrl-C does
        returned = run.wait(timeout=60)
        _gone(servers)  # Prefect's SIGTERM handling ends the process without its atexit stop
    finally:
        _stop(run, servers)
    text = log.read_text()
    assert returned == code and "ConnectError" not in text, _about_stops(text)
    if sig == signal.SIGINT:
        assert "interrupted; completed stages are kept" in text, _about_stops(text)
    with sqlite3.connect(prefect_home / "prefect.db") as db:  # the run as the UI shows it
        states = db.execute("select state_type from flow_run").fetchall()
    assert states == [("CRASHED",)], states


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_the_server_does_not_outlive_a_killed_run(tmp_path, prefect_home):
    """Out of the run's process group, the server must still end with it: a `kill -9` or a
    closed terminal must not leave a server behind."""
    run, log = _start(tmp_path, prefect_home)
    servers = _servers_of(run)
    try:
        run.kill()  # expert alone, SIGKILL: no atexit, no Prefect clean-up
        run.wait(timeout=30)
        _gone(servers)
    finally:
        _stop(run, servers)


def _about_stops(text: str) -> str:
    """A failed run's log for the report: every line that speaks of a signal (a resent or raised-again
    stop may be long before the end), then the end."""
    said = [line for line in text.splitlines() if re.search(r"SIG[A-Z]+|Terminat|KeyboardInterrupt|Exception ignored", line)]
    return "\n".join(said[-30:]) + "\n...\n" + text[-3000:]


def _servers_of(run: subprocess.Popen) -> list[int]:
    """The temporary server: `expert`'s uvicorn child (Linux /proc; [] elsewhere)."""
    if not Path("/proc").is_dir():
        return []
    servers = [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and _child_server(int(pid), run.pid)]
    assert len(servers) == 1, servers
    return servers


def _gone(servers: list[int], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while any(_alive(pid) for pid in servers):
        assert time.monotonic() < deadline, "the temporary server outlived the run"
        time.sleep(0.2)


def _child_server(pid: int, parent: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return int(stat.rsplit(")", 1)[1].split()[1]) == parent and b"uvicorn" in command


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; only its parent's wait is missing


# `expert run`, with the quantize stage's GPTQ streamed and checkpointed per layer as on every GPU,
# sent SIGTERM once the first layer is quantized and not yet committed.
CHECKPOINTED_GPTQ_RUN = textwrap.dedent("""
    import os, signal, sys
    from expert.cli import main
    from expert.quantize import checkpoint, gptq
    gptq.offload_to_disk = lambda model_dir: True
    quantized = checkpoint.LayerProgress.__call__
    def then_stop(self, layer_idx, submodule_finalized):
        quantized(self, layer_idx, submodule_finalized)
        if layer_idx == 0 and not submodule_finalized:
            os.kill(os.getpid(), signal.SIGTERM)
    checkpoint.LayerProgress.__call__ = then_stop
    sys.exit(main(sys.argv[1:]))
""")


def test_sigterm_during_checkpointed_gptq_commits_the_layer_and_prefect_records_the_crash(tmp_path, prefect_home):
    """While GPTQ keeps layer checkpoints, gptqmodel holds SIGTERM (what a deployment's cancel or
    a container stop sends): the layer in progress is committed, then the stop must reach
    Prefect's handler, not end the stage as a failed CheckpointStopped (`expert/quantize/stops.py`)."""
    run, log = _launch(tmp_path, prefect_home, [sys.executable, "-c", CHECKPOINTED_GPTQ_RUN])
    try:
        returned = run.wait(timeout=300)
    finally:
        _stop(run)
    text = log.read_text()
    assert returned == -signal.SIGTERM, text[-3000:]
    assert "GPTQ: SIGTERM: stopping once the layer in progress is committed" in text, text[-3000:]
    committed = re.search(r"GPTQ: stopped, its layers committed to (\S+?);", text)
    assert committed and any(Path(committed[1]).iterdir()), text[-3000:]
    assert "CheckpointStopped" not in text and "train: building" not in text, text[-3000:]
    with sqlite3.connect(prefect_home / "prefect.db") as db:
        states = db.execute("select state_type from flow_run").fetchall()
    assert states == [("CRASHED",)], states
