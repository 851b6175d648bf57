"""GPTQ that survives a crash: gptqmodel's layer checkpoints in the stage's work folder, and
progress by layer.

GPTQ of a 33B model takes tens of minutes on a GPU, layer after layer. gptqmodel (7.4+) can
commit each finished layer (the packed weights and the next layer's calibration inputs) to a
checkpoint folder and, run again with the same source weights, calibration, settings, software
and devices, continue after the last committed layer. The weights come out bit-identical to an
uninterrupted run (tests/expert/test_faults.py kills one to check it). Its limits, which decide when the
stage uses it: Llama-family (`llama`) and Qwen3-MoE models, and only when gptqmodel streams the
checkpoint from disk (`offload_to_disk`, see gptq.py: every GPU run and every large CPU one; a
small model on a CPU is loaded whole and quantized in a few minutes without it). A Ctrl-C or
SIGTERM meanwhile: stops.py.

    checkpoint = layer_checkpoint(work_dir, model)   # None where it does not apply
    model.layer_callback = LayerProgress(total, on_layer)
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "gptq-checkpoint"  # inside the stage's work folder (`.work-<key>`)
_CURRENT = "CURRENT"  # gptqmodel's list of published generations: there only once a layer is committed


def layer_checkpoint(work_dir: Path | None, model: Any) -> Any | None:
    """gptqmodel's CheckpointConfig for `model` in `work_dir`, or None where it cannot apply.

    `model` is the loaded GPTQModel; its settings and architecture decide support.
    """
    if work_dir is None:
        return None
    reason = _unsupported(model)
    if reason:
        log.info("GPTQ keeps no layer checkpoints here (%s): a crash restarts it from the first layer", reason)
        return None
    from gptqmodel import CheckpointConfig

    folder = Path(work_dir) / CHECKPOINT_DIR
    if (folder / _CURRENT).is_file():
        log.info("GPTQ: an interrupted run left layer checkpoints in %s; continuing after its last layer", folder)
    return CheckpointConfig(path=str(folder), resume="auto", interval="layer:1", keep_last=2)


def forget(work_dir: Path | None) -> None:
    """Remove checkpoints that do not fit this run (made with other versions or devices)."""
    if work_dir is not None:
        shutil.rmtree(Path(work_dir) / CHECKPOINT_DIR, ignore_errors=True)


def mismatch_error() -> type[Exception]:
    """The error gptqmodel raises when a folder's checkpoints were made by another run (or are
    damaged). Not exported by gptqmodel, like the support check below: pyproject pins the version."""
    from gptqmodel.looper.checkpoint_store import CheckpointError

    return CheckpointError


def stopped_error() -> type[Exception]:
    """What gptqmodel raises once it has committed the layer in progress after a stop signal
    (a CheckpointError too: catch it first)."""
    from gptqmodel.looper.checkpoint import CheckpointStopped

    return CheckpointStopped


def _unsupported(model: Any) -> str | None:
    """Why gptqmodel cannot checkpoint this run, or None. Its own check, before any work."""
    if not getattr(model.quantize_config, "offload_to_disk", False):
        return "the model is loaded whole, not streamed from disk"
    # gptqmodel's own list of what it can checkpoint, so new architectures come with an upgrade
    from gptqmodel.looper.gptq_checkpoint import validate_checkpoint_support

    try:
        validate_checkpoint_support(model)
    except (NotImplementedError, ValueError) as exc:
        return str(exc)
    return None


class LayerProgress:
    """gptqmodel's layer callback: reports each quantized layer as (layers done, layers).

    gptqmodel calls it twice a layer: once when the layer is quantized (`submodule_finalized`
    False, in the quantization loop's own thread) and once when its packing is finished, which
    may come from a worker thread. Only the first is reported, so `on_layer` runs in the thread
    that called `quantize`. After a resume the first call is the first layer not yet committed.
    """

    def __init__(self, total: int, on_layer: Callable[[int, int], None] | None = None):
        self.total, self.on_layer = total, on_layer
        self.first: int | None = None  # the first layer this process quantized
        self._since = time.perf_counter()  # the previous layer's end (first: the call's start)

    def __call__(self, layer_idx: int, submodule_finalized: bool) -> None:
        if submodule_finalized:
            return
        now = time.perf_counter()
        seconds, self._since = now - self._since, now
        if self.first is None:
            self.first = layer_idx
            if layer_idx:
                log.info("GPTQ: resumed from a checkpoint; layers 1-%d were already quantized", layer_idx)
        log.info("GPTQ: layer %d/%d quantized (%.1f s)", layer_idx + 1, self.total, seconds)
        if self.on_layer is not None:
            self.on_layer(layer_idx + 1, self.total)
