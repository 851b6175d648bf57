"""Start a training run on several processes with torchrun, and report back as one run would.

    summary = launch(config, model_dir, data_dir, out_dir, work_dir, progress, device)

`expert.train.train` calls this when `config.processes` > 1 (holding work_dir's lock). It runs

    python -m torch.distributed.run --nproc-per-node N --master-addr 127.0.0.1 --master-port P \\
        --log-dir WORK/torchrun --tee 3 -m expert.train.worker WORK/launch.json

and streams every line the ranks print into the `expert.train` logger (rank 0's progress lines
become `progress` calls). When a rank fails, torchrun stops the others and names the first
failure ("Root Cause"); that rank, its error (from its @record error file, or the signal that
killed it) and its last lines become one ExpertError. The checkpoints stay in work_dir, so the
same call again resumes from the last complete one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from collections import deque
from pathlib import Path

import expert
from expert.errors import ConfigError, ExpertError
from expert.train.config import FSDP_GPTQ, TrainConfig
from expert.train.logging import Progress
from expert.train.worker import PROGRESS

log = logging.getLogger("expert.train")
TAIL_LINES = 15  # of the failed rank's output, in the error
_RANK_LINE = re.compile(r"^\[default(\d+)\]:(.*)$")  # torchrun --tee prefixes each rank's lines
# The worker's own records ("LEVEL expert.x: message"): relayed at that level, under this logger.
_LEVEL = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) (?:expert[\w.]*: )?")


def launch(config: TrainConfig, model_dir: Path, data_dir: Path, out_dir: Path, work_dir: Path,
           progress: Progress | None = None, device: str = "auto") -> dict:
    """Run the training on config.processes ranks; the summary as `train` returns it."""
    from expert.train.loop import short_summary

    check_before_start(config, model_dir, device)
    spec = work_dir / "launch.json"
    # Every field, not the canonical (key) form: the ranks need log_every_steps too.
    spec.write_text(json.dumps({"config": config.model_dump(mode="json"), "model_dir": str(model_dir),
                                "data_dir": str(data_dir), "out_dir": str(out_dir), "work_dir": str(work_dir),
                                "device": device}))
    stream = _Stream(progress)
    code = _run(command(config.processes, spec, work_dir / "torchrun"), stream)
    if code:
        raise ExpertError(stream.failure(code, config.processes, work_dir))
    return short_summary(json.loads((Path(out_dir) / "summary.json").read_text()))


def check_before_start(config: TrainConfig, model_dir: Path, device: str) -> None:
    """Refuse, before any process starts, what the strategy cannot do with this base or machine."""
    import torch

    from expert.modeling import model_kind

    if config.strategy == "fsdp" and model_kind(model_dir) == "gptq":
        raise ConfigError(f"'train.strategy' is fsdp and the base {model_dir} is GPTQ-quantized: {FSDP_GPTQ}")
    # device_count asks the driver without opening a CUDA context in this (parent) process.
    gpus = torch.cuda.device_count() if device != "cpu" and torch.cuda.is_available() else 0
    if 0 < gpus < config.processes:
        raise ConfigError(f"'train.processes' is {config.processes} but this machine shows {gpus} GPU(s); "
                          f"use one process per GPU (processes: {gpus}), or device cpu")


def command(processes: int, spec: Path, log_dir: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(processes),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "--log-dir", str(log_dir),
            "--tee", "3", "-m", "expert.train.worker", str(spec)]


def free_port() -> int:
    """A port free now (the OS picks it); torchrun binds it a moment later."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], stream: _Stream) -> int:
    # The workers import `expert` from where this process did, whatever the working directory.
    root = str(Path(expert.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
           "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}  # bars are for terminals; lines come as they go
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    try:
        for line in proc.stdout:
            stream.line(line.rstrip("\n"))
        return proc.wait()
    except BaseException:  # an interrupt or a failing callback: torchrun stops its ranks on SIGTERM
        proc.terminate()
        proc.wait()
        raise


def _die_with_parent() -> None:
    """Linux: torchrun gets SIGTERM if this process dies (even by kill -9), so no rank outlives
    the run that holds work_dir's lock."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class _Stream:
    """Log each line as it comes; keep what a failure report needs."""

    def __init__(self, progress: Progress | None):
        self.progress = progress
        self.tails: dict[int, deque[str]] = {}
        self.launcher: deque[str] = deque(maxlen=200)  # torchrun's own lines, with its failure summary

    def line(self, text: str) -> None:
        match = _RANK_LINE.match(text)
        if not match:
            self.launcher.append(text)
            if text.strip():
                log.info("torchrun: %s", text)
            return
        rank, body = int(match.group(1)), match.group(2)
        at = body.find(PROGRESS)  # not always at the start: a library may leave a line unfinished
        if at >= 0:
            done, total = map(int, body[at:].split()[1:3])
            if self.progress is not None:
                self.progress(done, total)
            body = body[:at]
            if not body.strip():
                return
        if not body.strip():  # libraries print spacer lines; in the run log they are noise
            return
        self.tails.setdefault(rank, deque(maxlen=TAIL_LINES)).append(body)
        level = _LEVEL.match(body)
        log.log(getattr(logging, level.group(1)) if level else logging.INFO, "[rank %d] %s", rank,
                body[level.end():] if level else body)

    def failure(self, code: int, processes: int, work_dir: Path) -> str:
        rank, error = _root_cause(list(self.launcher))
        tail = "\n".join(self.tails.get(rank, [])) if rank is not None else "\n".join(list(self.launcher)[-TAIL_LINES:])
        who = f"rank {rank} of {processes}" if rank is not None else f"torchrun (exit code {code})"
        return (f"training failed on {who}: {error or 'no error recorded'}\n"
                f"its last output lines:\n{tail}\n"
                f"Checkpoints are kept in {work_dir / 'checkpoints'}: run the stage again to resume from the last "
                f"complete one (logs of every rank in {work_dir / 'torchrun'})")


# An error a rank raises only because another rank went away first.
_KNOCK_ON = re.compile(r"Connection (reset|closed) by peer|Broken pipe|DistBackendError|NCCL communicator was "
                       r"aborted|remote process exited|Socket Timeout|Connection refused", re.IGNORECASE)


def _root_cause(lines: list[str]) -> tuple[int | None, str]:
    """(rank, error) of the rank that failed first, from torchrun's failure report.

    torchrun's "Root Cause" is the first failure it *observed*, which under load can be a rank
    that only lost its peer (a gloo "Connection reset by peer" while the rank that was killed is
    listed under "Failures"). So the report's entries are ranked: a rank killed by a signal other
    than torchrun's own SIGTERM, then a Python error that is not such a knock-on, then the root
    cause as torchrun saw it.
    """
    entries = _report_entries(lines)
    if not entries:
        return None, ""

    def rank_of(entry: dict) -> int:
        code, error = entry["exitcode"], entry["error"]
        if code is not None and code < 0 and code != -signal.SIGTERM:
            return 0
        if code is not None and code > 0 and error and not _KNOCK_ON.search(error):
            return 1
        return 2 if entry["root"] else 3

    best = min(entries, key=rank_of)
    return best["rank"], best["error"]


def _report_entries(lines: list[str]) -> list[dict]:
    """Each "[i]:" entry of torchrun's Failures / Root Cause blocks: rank, exit code, last error line."""
    try:
        first = min(i for i, line in enumerate(lines) if line.startswith(("Failures:", "Root Cause")))
    except ValueError:
        return []
    entries: list[dict] = []
    root, current, traceback = False, None, False
    for line in lines[first:]:
        if line.startswith("Root Cause"):
            root = True
        if re.match(r"^\[\d+\]:\s*$", line):
            current = {"rank": None, "exitcode": None, "error": "", "root": root}
            entries.append(current)
            traceback = False
            continue
        if current is None or line.startswith(("=", "-")):
            current, traceback = (None, False) if line.startswith(("=", "-")) else (current, traceback)
            continue
        if m := re.match(r"\s*rank\s*:\s*(\d+)", line):
            current["rank"] = int(m.group(1))
        elif m := re.match(r"\s*exitcode\s*:\s*(-?\d+)", line):
            current["exitcode"] = int(m.group(1))
        elif m := re.match(r"\s*traceback\s*:\s*(.*)", line):
            traceback = True
            current["error"] = m.group(1).strip()
        elif traceback and line.strip():
            # A Python error's traceback ends with "Type: message"; a signal's is one line.
            current["error"] = line.strip()
    return [e for e in entries if e["rank"] is not None and e["exitcode"] is not None]
