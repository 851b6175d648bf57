"""GPTQ with gptqmodel's own API (`GPTQModel.load` + `quantize` + `save`).

The output is a standard GPTQ Hugging Face folder (config.json with `quantization_config`,
safetensors, tokenizer) that `expert.modeling.load_model` reads through transformers. Going
through transformers' `GPTQConfig` + optimum instead took 2.4x as long on a CPU: optimum runs
every calibration sample through the whole block once per group of layers plus once for its
output (5 full passes), in the checkpoint's float32; gptqmodel stops each pass after the
layers it is collecting, and on a bfloat16-capable CPU runs the forwards in bfloat16. At most
one full-precision copy of the model is in memory (none for a large checkpoint: see
`offload_to_disk`). The calibration samples are handed over already tokenized, so `max_length`
is exact.

    check_group_size(model_dir, 64)             # before spending any time
    log = run_gptq(config, model_dir, samples, tokenizer, out)   # writes the quantized HF folder
    log = run_gptq(..., work_dir=work, layers=LayerProgress(n, tick))   # layer checkpoints in `work`
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator

import torch

from expert.errors import ConfigError, ExpertError
from expert.modeling import carry_code_consent, remote_code_trusted
from expert.quantize.checkpoint import LayerProgress, forget, layer_checkpoint, mismatch_error, stopped_error
from expert.quantize.config import GROUP_SIZES, QuantizeConfig
from expert.quantize.report import weights_bytes
from expert.quantize.stops import STOPPED, StopsDuringGptq

_log = logging.getLogger(__name__)

_WORKERS_ENV = "GPTQMODEL_CPU_WORKERS"
_NOTEBOOK_ENV = "LOGBAR_DISABLE_NOTEBOOK_DETECTION"
_TERM_ENV = "TERM"  # logbar: "dumb" is headless (no redrawn bars)
_OFFLOAD_KEYS = ("offload_to_disk", "offload_to_disk_path")


def quantized_layer_sizes(model_dir: Path) -> dict[str, int]:
    """Input size of every linear layer GPTQ will quantize (those inside the repeated blocks).

    Built on the meta device from config.json: no weights are read. Uses optimum's block and layer
    discovery (optimum is what transformers loads GPTQ folders with): every linear layer of the
    repeated blocks, the set gptqmodel quantizes for Llama-family models.
    """
    from optimum.gptq.utils import get_layers

    block_name, blocks = _blocks(model_dir)
    sizes = {}
    for i, block in enumerate(blocks):
        for name, layer in get_layers(block).items():
            sizes[f"{block_name}.{i}.{name}"] = int(layer.weight.shape[-1])
    return sizes


def block_count(model_dir: Path) -> int:
    """How many repeated blocks (decoder layers) GPTQ goes through, one after the other."""
    return len(_blocks(model_dir)[1])


def _blocks(model_dir: Path) -> tuple[str, Any]:
    """(name, module list) of the model's repeated blocks, on the meta device."""
    from optimum.gptq.utils import get_block_name_with_pattern
    from transformers import AutoConfig, AutoModelForCausalLM

    trusted = remote_code_trusted(model_dir)
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trusted)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trusted)
    block_name = get_block_name_with_pattern(model)
    return block_name, model.get_submodule(block_name)


def check_group_size(model_dir: Path, group_size: int) -> None:
    """Raise ConfigError naming the layers whose input size `group_size` does not divide."""
    if group_size == -1:
        return
    sizes = quantized_layer_sizes(model_dir)
    bad = {name: size for name, size in sizes.items() if size % group_size}
    if not bad:
        return
    fitting = [g for g in GROUP_SIZES if all(s % g == 0 for s in sizes.values())] + [-1]
    by_size: dict[int, list[str]] = {}
    for name, size in bad.items():
        by_size.setdefault(size, []).append(name)
    detail = "; ".join(f"input size {size}: {len(names)} layers (e.g. {names[0]})"
                       for size, names in sorted(by_size.items()))
    raise ConfigError(
        f"quantize.group_size {group_size} does not divide the input size of {len(bad)} of the "
        f"{len(sizes)} layers to quantize ({detail}). Group sizes that fit every layer: "
        f"{', '.join(map(str, fitting))} (-1 = one group per row).")


def run_gptq(config: QuantizeConfig, model_dir: Path, samples: list[dict[str, torch.Tensor]],
             tokenizer: Any, out_dir: Path, work_dir: Path | None = None,
             layers: LayerProgress | None = None) -> list[dict[str, Any]]:
    """Quantize `model_dir` with `samples`, save model + tokenizer into `out_dir`; return
    gptqmodel's per-module log (layer, module, GPTQ loss, damping).

    `work_dir`: a folder that outlives a crash; where gptqmodel can (checkpoint.py), each
    quantized layer is committed there and a rerun with the same folder continues after the
    last one. `layers` reports each quantized layer (by default to the log only).
    """
    calibration = [{"input_ids": s["input_ids"][0].tolist(), "attention_mask": s["attention_mask"][0].tolist()}
                   for s in samples]
    # gptqmodel's own offload folder is a TemporaryDirectory in $TMPDIR, which a killed run
    # never removes (a model's worth of weights); beside `out_dir`, a build's `.tmp-*` folder in
    # the store, it shares the name the store's debris sweep removes. With layer checkpoints
    # gptqmodel spills into the checkpoint folder instead.
    spill = Path(out_dir).with_name(Path(out_dir).name + "-offload") if offload_to_disk(model_dir) else None
    layers = layers or LayerProgress(block_count(model_dir))
    try:
        with cpu_workers(), quiet_progress():
            model, log = _quantize(config, model_dir, calibration, tokenizer, spill, work_dir, layers)
            model.save(str(out_dir))
        del model
    finally:
        if spill is not None:
            shutil.rmtree(spill, ignore_errors=True)
    carry_code_consent(model_dir, Path(out_dir))
    _drop_offload_settings(Path(out_dir))
    return _log_rows(log)


def _quantize(config: QuantizeConfig, model_dir: Path, calibration: list[dict], tokenizer: Any,
              spill: Path | None, work_dir: Path | None, layers: LayerProgress) -> tuple[Any, Any]:
    """Load and quantize in place; (model, gptqmodel's log). Checkpoints left by another run
    (other software versions or devices: gptqmodel refuses them before the first layer) are
    removed and the run starts from the first layer."""
    try:
        return _load_and_quantize(config, model_dir, calibration, tokenizer, spill, work_dir, layers)
    except mismatch_error() as exc:
        if layers.first is not None:  # refused after quantizing: not a leftover, a real failure
            raise
        reason = str(exc)
    # Outside the except block, whose traceback would keep the first model alive during the second.
    _log.warning("GPTQ: the checkpoints in %s are not this run's (%s); removing them and quantizing "
                 "from the first layer", work_dir, reason)
    forget(work_dir)
    gc.collect()
    return _load_and_quantize(config, model_dir, calibration, tokenizer, spill, work_dir, layers)


def _load_and_quantize(config: QuantizeConfig, model_dir: Path, calibration: list[dict], tokenizer: Any,
                       spill: Path | None, work_dir: Path | None, layers: LayerProgress) -> tuple[Any, Any]:
    from gptqmodel import GPTQModel

    model = GPTQModel.load(str(model_dir), gptqmodel_config(config, spill is not None, spill),
                           trust_remote_code=remote_code_trusted(model_dir))
    model.layer_callback = layers
    checkpoint = layer_checkpoint(work_dir, model)
    # min length 2: the samples were already filtered by tokenize_samples; gptqmodel's default
    # (10) would silently drop short ones the report counts.
    if checkpoint is None:
        return model, model.quantize(calibration, tokenizer=tokenizer, calibration_data_min_length=2)
    stopped = log = None
    with StopsDuringGptq(work_dir) as stops:  # a second stop ends the process there and then
        try:
            log = model.quantize(calibration, tokenizer=tokenizer, calibration_data_min_length=2,
                                 checkpoint=checkpoint)
        except stopped_error() as exc:  # a stop gptqmodel took: the layer in progress is committed
            stopped = exc
    if stops.received:
        _log.warning(STOPPED.format(work_dir))
        stops.pass_on()  # a Ctrl-C ends as KeyboardInterrupt, a SIGTERM as Prefect's TerminationSignal
    if stopped is not None:  # the signal was ignored before gptqmodel took it for itself
        raise ExpertError(f"GPTQ stopped on a signal ({stopped}); its layers are committed to {work_dir}, "
                          "and the same command continues after them")
    return model, log


def gptqmodel_config(config: QuantizeConfig, offload: bool = True, offload_path: Path | None = None):
    """gptqmodel's QuantizeConfig: its defaults, with the settings our config names.

    Among its defaults: on a CPU with bfloat16 support the block forwards run in bfloat16 (the
    Hessians accumulate in float32). `offload` is gptqmodel's `offload_to_disk` (see
    `offload_to_disk`), into `offload_path` (else a temporary folder of gptqmodel's); it changes
    memory and time, not the result.
    """
    from gptqmodel import QuantizeConfig as GPTQModelConfig

    return GPTQModelConfig(bits=config.bits, group_size=config.group_size, desc_act=config.desc_act,
                           sym=config.sym, damp_percent=config.damp_percent,
                           act_group_aware=config.act_group_aware and not config.desc_act,
                           offload_to_disk=offload,
                           **({"offload_to_disk_path": str(offload_path)} if offload and offload_path else {}))


def offload_to_disk(model_dir: Path) -> bool:
    """Whether gptqmodel should read the checkpoint one block at a time instead of loading it.

    Block by block keeps peak memory near one block, but cost a third more time on SmolLM2-135M
    on the CPU (its turtle model re-materializes each block from disk); loaded whole, the model
    is one copy in memory. So on a CPU-only machine only a checkpoint over a quarter of the RAM
    is read block by block (on 24 GiB: SmolLM2 loaded, an 8B model streamed). With a GPU,
    gptqmodel's default (streamed) stays: it keeps host memory near one block, and on an H200 it
    quantized a 2-layer 8B-shaped checkpoint in 20.1 s, against 48.0 s for gptqmodel's own call,
    ~28 s of which built its packing extension (bench/results/gpu_h200_2026-11-26d.json; an
    earlier 70.9 vs 27.9 s gap was that one-off build, paid by whichever process ran first). The
    quantized weights are bit-identical either way (measured on both), so the choice does not
    enter the cache key.
    """
    if torch.cuda.is_available():
        return True
    return weights_bytes(model_dir) > _physical_memory() / 4


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume little memory, stream
        return 0


def _log_rows(log: Any) -> list[dict[str, Any]]:
    rows = log.get("gptq", []) if isinstance(log, dict) else (log or [])
    out = []
    for row in rows:
        try:
            out.append({"layer": int(row["layer"]), "module": str(row["module"]), "loss": float(row["loss"]),
                        "damp": float(row["damp"])})
        except (KeyError, TypeError, ValueError):  # a row of another processor or format
            continue
    return out


def _drop_offload_settings(out_dir: Path) -> None:
    """gptqmodel records its offload setting and temporary folder (a path of this machine, gone
    after the run) in the saved configs. They say how the run used memory, not what the weights
    are: leave them out, so the same quantization writes the same files on any machine."""
    for name, inner in (("config.json", "quantization_config"), ("quantize_config.json", None)):
        path = out_dir / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        quant = data.get(inner) if inner else data
        if isinstance(quant, dict) and isinstance(quant.get("meta"), dict):
            for key in _OFFLOAD_KEYS:
                quant["meta"].pop(key, None)
            path.write_text(json.dumps(data, indent=2, sort_keys=inner is not None) + "\n")


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """gptqmodel's progress bars (logbar) look for a Jupyter front end on every redraw, an import
    attempt that took ~15 % of a CPU quantization here; say there is none, for the call only.

    Where stdout is no terminal (a log file, a Prefect worker's pipe, `nohup`), logbar still
    redraws its bars, and every redraw lands there as text: 2.0 MB for the default preset's GPTQ of
    SmolLM2, against 0.16 MB without them. TERM=dumb (which is what such a stream is) makes logbar
    headless for the call: no bars, its log lines kept; the stage logs each layer itself.
    LOGBAR_FORCE_PROGRESS=1 keeps the bars."""
    with _env_default(_NOTEBOOK_ENV, "1"), _env_set(_TERM_ENV, None if _stdout_is_terminal() else "dumb"):
        yield


def _stdout_is_terminal() -> bool:
    isatty = getattr(sys.stdout, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (OSError, ValueError):  # closed or detached
        return False


@contextlib.contextmanager
def _env_set(name: str, value: str | None) -> Iterator[None]:
    """Set environment variable `name` to `value` for the block (None: leave it), then put it back."""
    if value is None:
        yield
        return
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


@contextlib.contextmanager
def cpu_workers() -> Iterator[None]:
    """gptqmodel sizes its CPU pool at ~cores/2 but one of its pools asks for 2 workers, so on a
    2-core machine quantization fails ("Virtual pool ... requests 2 workers"). Set the override
    for the duration of the call, only if the user has not set it, and restore it after."""
    with _env_default(_WORKERS_ENV, str(max(2, ((os.cpu_count() or 1) + 1) // 2))):
        yield


def _env_default(name: str, value: str) -> contextlib.AbstractContextManager[None]:
    """Set environment variable `name` for the duration of the block unless the user set it."""
    return _env_set(name, None if os.environ.get(name) is not None else value)
