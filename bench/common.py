"""What every benchmark script shares: the machine description, the newest artifact of a
stage (its default input), and writing bench/results/NAME.json."""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def describe_machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, CPU only"


def newest_artifact(stage: str, hint: str = "run `make run` first") -> Path:
    """The most recently written complete artifact of `stage` under artifacts/."""
    found = sorted((ROOT / "artifacts" / stage).glob("*/manifest.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"no artifacts/{stage}/*/ here; pass the folder explicitly, or make one: {hint}")
    return found[-1].parent


def write_result(path: str | Path, result: dict) -> None:
    """Write the result JSON (the format bench/README.md describes) and show it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def command_line(script: str, args, parser, placeholders: dict[str, str] | None = None, prefix: str = "",
                 skip: tuple[str, ...] = ()) -> str:
    """`python bench/SCRIPT` and the flags that differ from the parser's defaults, for a result's
    `command`. Folder flags show the placeholder that stands for them (`placeholders`: dest -> name)
    and --out none: where this machine keeps its files is no part of a result."""
    placeholders = placeholders or {}
    cmd = f"{prefix}python bench/{script}"
    for key, value in vars(args).items():
        if key == "out" or key in skip or value == parser.get_default(key):
            continue
        flag = f" --{key.replace('_', '-')}"
        cmd += flag + ("" if value is True else f" {placeholders.get(key, value)}")
    return cmd


@contextmanager
def work_dir(prefix: str, given: str | None = None) -> Iterator[Path]:
    """The folder a benchmark writes its models and runs to: `given` is kept, a temp one removed.

    Benchmarks run in CI (their smoke tests): a temp folder left behind per run fills /tmp.
    """
    if given:
        Path(given).mkdir(parents=True, exist_ok=True)
        yield Path(given)
        return
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def peak_rss_kib() -> int:
    """This process's peak RSS in KiB: /proc's VmHWM, which starts afresh at exec. ru_maxrss
    carries the parent's peak across fork and exec: a benchmark child started by a parent that
    had loaded a model would report the parent's peak as its own."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def alternating_rounds(rounds: int, sides: tuple[str, str], run: Callable[[str, int], dict],
                       label: str = "round") -> dict[str, list[dict]]:
    """`run(side, round)` for both sides, `rounds` times, alternating which goes first (the first
    meets a cold page cache, and a shared machine's load drifts): each side's runs, in order."""
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for round_ in range(rounds):
        for side in sides if round_ % 2 == 0 else sides[::-1]:
            runs[side].append(run(side, round_))
            print(f"{label} {round_ + 1}: {side} {runs[side][-1]['seconds']:.1f} s", flush=True)
    return runs


def median_run(rows: list[dict]) -> dict:
    """The run of median wall time (the lower middle one of an even count)."""
    return sorted(rows, key=lambda row: row["seconds"])[(len(rows) - 1) // 2]


# A benchmark side that must not share a process with the other (peak memory, imports, a fresh
# allocator) runs as a child of its own script, which prints one tagged line with its result.
_TAG = "RESULT "


def print_child_result(result: dict) -> None:
    print(_TAG + json.dumps(result), flush=True)


class ChildFailed(SystemExit):
    """A child benchmark process that gave no result; `proc` holds all it printed (for its log)."""

    def __init__(self, message: str, proc: subprocess.CompletedProcess):
        super().__init__(message)
        self.proc = proc


def run_child(cmd: list[str], what: str, log: Path | None = None,
              **run_kwargs) -> tuple[dict, subprocess.CompletedProcess]:
    """Run a child benchmark process; its result, or ChildFailed (a SystemExit) with its stderr's
    tail when it has none. With `log`, all the child prints goes to that file as it is printed
    (stderr into stdout), not into memory: a run killed from outside keeps it."""
    if log is None:
        proc = subprocess.run(cmd, capture_output=True, text=True, **run_kwargs)
        stdout, stderr = proc.stdout, proc.stderr
    else:
        with open(log, "w") as handle:
            proc = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, text=True, **run_kwargs)
        stdout = stderr = Path(log).read_text(errors="replace")
    lines = [line for line in stdout.splitlines() if line.startswith(_TAG)]
    if proc.returncode != 0 or not lines:
        raise ChildFailed(f"{what} failed (exit {proc.returncode}):\n{stderr[-4000:]}", proc)
    return json.loads(lines[-1][len(_TAG):]), proc
