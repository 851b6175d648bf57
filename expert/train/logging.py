"""Training progress: a tqdm bar, a `progress(done, total)` callback, log lines, TensorBoard, JSONL.

Every `log_every` optimizer steps one record {step, epoch, loss, lr, tokens_per_s, tokens,
seconds, memory_mb, grad_norm} goes to the `expert.train` logger, to `train_log.jsonl` and to TensorBoard
(`tensorboard/`); dev losses go to the same places. `plot_loss` draws `loss.png` from the JSONL.
On resume, records after the resumed step are dropped from the JSONL and purged from
TensorBoard, and the steps since the last record that the checkpoint holds (`pending`) open
the averaging window again, so the logs read like one uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import resource
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger("expert.train")

Progress = Callable[[int, int], None]


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on a GPU, peak RSS of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


class TrainLogger:
    """All progress reporting of one run (or one resumed piece of it)."""

    def __init__(self, log_dir: Path, total_steps: int, start_step: int, log_every: int,
                 device: torch.device, progress: Progress | None = None, pending: list | None = None):
        from torch.utils.tensorboard import SummaryWriter
        from tqdm.auto import tqdm

        self.total, self.every, self.device, self.progress = total_steps, log_every, device, progress
        self.jsonl = Path(log_dir) / "train_log.jsonl"
        self.records = _truncate_jsonl(self.jsonl, start_step)
        board = Path(log_dir) / "tensorboard"
        if not start_step:  # a fresh run: events of an abandoned one must not mix in
            shutil.rmtree(board, ignore_errors=True)
        self.writer = SummaryWriter(str(board), purge_step=start_step + 1 if start_step else None)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        # (loss, tokens, seconds) of the steps since the last record; a resumed run gets its checkpoint's
        self._window: list[tuple[float, int, float]] = [tuple(w) for w in pending or []]

    def step(self, step: int, epoch: float, loss: float, lr: float, tokens: int, seconds: float,
             grad_norm: float | None) -> None:
        """Account optimizer step `step` (1-based); emit a record every `log_every` steps and at the end."""
        self._window.append((loss, tokens, seconds))
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if step % self.every and step != self.total:
            return
        losses, tokens_sum, secs = zip(*self._window)
        self._window = []
        record = {
            "step": step, "epoch": round(epoch, 4), "loss": sum(losses) / len(losses), "lr": lr,
            "tokens_per_s": sum(tokens_sum) / max(sum(secs), 1e-9),
            "tokens": sum(tokens_sum), "seconds": round(sum(secs), 6),  # of the steps since the last record
            "memory_mb": round(peak_memory_mb(self.device), 1),
            "grad_norm": grad_norm,
        }
        log.info("step %d/%d epoch %.2f loss %.4f lr %.3g tokens/s %.0f memory %.0f MiB",
                 step, self.total, epoch, record["loss"], lr, record["tokens_per_s"], record["memory_mb"])
        for key in ("loss", "lr", "tokens_per_s", "memory_mb", "grad_norm"):
            if record[key] is not None:
                self.writer.add_scalar(f"train/{key}", record[key], step)
        self._append(record)

    def pending(self) -> list[list]:
        """The steps not yet averaged into a record, JSON-ready: a checkpoint keeps them for its resume."""
        return [list(w) for w in self._window]

    def dev(self, step: int, loss: float) -> None:
        log.info("step %d dev loss %.4f", step, loss)
        self.writer.add_scalar("dev/loss", loss, step)
        self._append({"step": step, "dev_loss": loss})

    def done(self, step: int) -> None:
        """Step `step` is finished (and checkpointed if due): move the bar, call the callback."""
        self.bar.update(step - self.bar.n)
        if self.progress is not None:
            self.progress(step, self.total)

    def close(self) -> None:
        self.bar.close()
        self.writer.close()

    def _append(self, record: dict) -> None:
        self.records.append(record)
        with self.jsonl.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.writer.flush()


class QuietLogger:
    """The reporting of a rank other than 0: nothing written or logged (rank 0 reports for all);
    the `progress` callback still sees each step."""

    def __init__(self, total_steps: int, progress: Progress | None = None):
        self.total, self.progress, self.records = total_steps, progress, []

    def step(self, *args) -> None:
        pass

    def pending(self) -> list[list]:
        return []

    def dev(self, step: int, loss: float) -> None:
        pass

    def done(self, step: int) -> None:
        if self.progress is not None:
            self.progress(step, self.total)

    def close(self) -> None:
        pass


def _truncate_jsonl(path: Path, last_step: int) -> list[dict]:
    """Keep the records up to `last_step` (the resumed checkpoint); later ones are redone."""
    records = _read_records(path) if path.is_file() and last_step else []
    records = [r for r in records if r["step"] <= last_step]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def _read_records(path: Path) -> list[dict]:
    """The records of a JSONL log up to its first line that does not decode to one.

    A crash can tear the last line (a short write when the disk fills, NUL bytes after a power
    loss); the log must not stop the run from resuming. What follows a torn line is dropped: it
    is the tail the crash left, whose steps come after the checkpoint and are logged again."""
    lines = path.read_bytes().split(b"\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a record with a step")
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            log.warning("%s: line %d does not read (%s), as a crash leaves a torn write; dropping it and "
                        "the %d line(s) after it", path, number, exc, sum(1 for x in lines[number:] if x.strip()))
            break
        records.append(record)
    return records


def plot_loss(records: list[dict], path: Path) -> None:
    """Training loss per logged step, dev loss at each checkpoint, as a PNG."""
    from matplotlib.figure import Figure  # not pyplot: no global backend switch, no GUI

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    dev = [(r["step"], r["dev_loss"]) for r in records if "dev_loss" in r]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="train (answer tokens)", color="tab:blue")
    if dev:
        ax.plot(*zip(*dev), "o-", label="dev (answer tokens)", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("LoRA training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
