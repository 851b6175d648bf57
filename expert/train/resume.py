"""What a restarted run resumes from: the newest checkpoint of its config that reads back whole,
and the precision the steps before it computed in.

    picked = pick_checkpoint(work_dir / "checkpoints", config)   # (step, folder) or None
    precision = resumed_precision(config, device, picked)         # "bfloat16" or "float32"

A crash can leave the newest checkpoint damaged (a power loss that kept the rename but not the
tensors): it is skipped for the one before it, and moved aside to `.bad-step-N` so that no later
run tries it again. Checkpoints of another config (compared on the fields the cache key holds)
are deleted, as the run starts over.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from expert.errors import ConfigError, ExpertError
from expert.train.checkpoint import complete_checkpoints, read_marker, read_state, set_aside, verify_checkpoint
from expert.train.config import TrainConfig
from expert.train.distributed import Ranks
from expert.train.logging import log
from expert.train.step import resolve_precision


def same_config(saved: Any, config: TrainConfig) -> bool:
    """Whether a checkpoint marker's config is `config` in every field of the cache key. A marker
    written when the key held more (log_every_steps) is read as a config first, so it still matches."""
    if not isinstance(saved, dict):
        return False
    if saved == config.canonical():
        return True
    try:
        return TrainConfig.from_dict(saved).canonical() == config.canonical()
    except ConfigError:  # a field this version does not know: not ours
        return False


def pick_checkpoint(root: Path, config: TrainConfig, ranks: Ranks = Ranks()) -> tuple[int, Path] | None:
    """(step, folder) of the newest checkpoint under `root` of `config` that verifies, else None.

    Every rank walks the folder the same way; rank 0 alone then moves the damaged ones aside (or
    deletes the folder when its checkpoints are another config's), after all have read it."""
    bad: list[tuple[Path, str]] = []
    for step, path in reversed(complete_checkpoints(root)):
        try:
            marker = read_marker(path)
        except (OSError, ValueError) as exc:  # a torn marker is damage too
            bad.append((path, f"its marker does not read: {exc}"))
            continue
        if not same_config(marker.get("config"), config):
            ranks.barrier()
            if ranks.main:
                log.warning("checkpoints in %s belong to another training config; starting over", root)
                shutil.rmtree(root)
            return None
        problem = verify_checkpoint(path)
        if problem is None:
            _set_aside(bad, ranks, f"step {step}")
            return step, path
        bad.append((path, problem))
    _set_aside(bad, ranks, "the start")
    return None


def _set_aside(bad: list[tuple[Path, str]], ranks: Ranks, resumed: str) -> None:
    if not bad:
        return
    ranks.barrier()  # every rank has verified before rank 0 renames
    if ranks.main:
        for path, problem in bad:
            aside = set_aside(path)
            log.warning("checkpoint %s is damaged (%s): moved it to %s; resuming from %s instead",
                        path, problem, aside.name, resumed)


def resumed_precision(config: TrainConfig, device: torch.device, picked: tuple[int, Path] | None) -> str:
    """The precision this run computes in: train.precision resolved here, or, on resume, what the
    checkpoint's steps computed in, so that one run never mixes the two. Refuses to resume bf16
    steps on a machine whose `auto` gives float32 (emulated bf16 is slower than float32)."""
    here = resolve_precision(config.precision, device)
    saved = read_state(picked[1]).get("precision") if picked else None
    if picked is None or saved is None or saved == here:
        if picked is not None and saved is None:
            log.warning("checkpoint %s does not record the precision its steps computed in (an older "
                        "version wrote it); the rest of the run computes in %s", picked[1], here)
        return here
    if saved == "float32":  # float32 runs anywhere: keep it
        log.info("checkpoint %s computed in float32: the run goes on in float32 (train.precision %s would "
                 "pick %s here)", picked[1], config.precision, here)
        return saved
    raise ExpertError(
        f"checkpoint {picked[1]} was trained in {saved} (train.precision {config.precision} on the machine "
        f"that wrote it), but this machine's {device.type} has no native bf16 matmuls, so 'auto' gives {here} "
        "here; resuming would mix precisions in one run. Resume on a machine with native bf16 (an Ampere or "
        "newer GPU; a CPU with AVX512-BF16 or AMX), or start the training over here: rerun with "
        "`--force train` (auto then picks float32), or set train.precision to float32 or bfloat16 explicitly")
