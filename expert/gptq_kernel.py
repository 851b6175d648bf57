"""Which gptqmodel kernel serves a GPTQ model: the one the user named, or "auto" where it can.

A user may name the kernel (eval.gptq_kernel, train.gptq_kernel; `chosen_backend`): it is checked
against the model and device before the load, and one that cannot run there fails with the
kernels that can, instead of gptqmodel's error from deep inside the load.

gptqmodel's "auto" choice takes its Machete kernel on a Hopper GPU (H100, H200). Machete is
JIT-built from the CUTLASS sources, which gptqmodel downloads from GitHub while the model loads:
in each layer's `post_init`, after the kernel is chosen, where a failure fails the whole load.
GPTQMODEL_OFFLINE=1 only turns the download into a RuntimeError there; the choice stays Machete.
(Both found on an H100 without internet: the evaluation of any GPTQ model died.)

So before a GPU load EXPERT gets the sources itself, as gptqmodel would (its cache,
GPTQMODEL_CUTLASS_DIR, or the download, here with a timeout), and when they cannot be had it names
the kernel "auto" would take after Machete, with a warning that says how to get Machete back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
from typing import Any, get_args

import torch

from expert.errors import ModelError

log = logging.getLogger(__name__)

# gptqmodel 7.6's "auto" order on CUDA after Machete (Swordfish, before it, is Blackwell-only), for
# a gptqmodel whose order cannot be read (`_after_machete` reads it from gptqmodel itself).
AFTER_MACHETE = ("gptq_marlin", "gptq_exllama_v2", "gptq_triton", "gptq_torch")
# Per process: why the CUTLASS sources could not be had, so that later loads do not try again.
_missing_sources: dict[str, str] = {}
# aten::_weight_int4pack_mm_for_cpu: "expect qGroupSize to be 32, 64, 128 or 256". gptqmodel's
# TorchAtenLinear accepts other sizes, and fails on the first forward.
_ATEN_INT4_GROUP_SIZES = (32, 64, 128, 256)
# gptqmodel downloads with urlopen and no timeout: behind a firewall that drops packets it would
# wait forever. A stalled connect or read fails after this many seconds instead.
NETWORK_TIMEOUT_S = 60


def inference_backend(stored: dict[str, Any], device: torch.device, dtype: torch.dtype) -> str:
    """"auto", or the kernel after Machete when Machete would be picked without its sources.

    stored: the model's `quantization_config` from config.json.
    """
    if device.type != "cuda" or not _machete_needs_sources(device):
        return "auto"
    reason = _cutlass_missing()
    if reason is None:
        return "auto"
    backend = next((name for name in _after_machete() if _kernel_fits(name, stored, device, dtype)), "gptq_torch")
    log.warning("gptqmodel's Machete kernel (Hopper GPUs) is built from the CUTLASS v4.7.1 sources, "
                "which could not be had (%s); EXPERT loads the GPTQ model with %s instead. To use "
                "Machete, set GPTQMODEL_CUTLASS_DIR to a CUTLASS v4.7.1 checkout, or load once online "
                "(gptqmodel then caches the sources in GPTQMODEL_CACHE_DIR, by default "
                "~/.cache/gptqmodel). To choose the kernel yourself, set eval.gptq_kernel (triton needs no "
                "extension build)", reason, backend)
    return backend


def training_backend(stored: dict[str, Any], device: torch.device) -> str:
    """The kernel gptqmodel's "auto_trainable" would train with on `device`, by name.

    gptqmodel's auto choice walks its kernels in order and runs each one's one-off check before it
    asks whether the kernel trains, and that check builds the kernel's extension: on a fresh H200,
    about 30 s building ExLlamaV2 for a model it then trained with Triton
    (bench/results/gpu_h200_2026-11-28d.log). Here only kernels that train on this kind of device
    are checked, in gptqmodel's own order. "auto_trainable" where none fits or the order is not
    gptqmodel 7's.
    """
    for backend, cls in _auto_order() or ():
        if (getattr(cls, "SUPPORTS_TRAINING", False) and _devices(cls) & {device.type, "all"}
                and _kernel_fits(backend, stored, device, None)):
            return backend
    return "auto_trainable"


def _auto_order() -> list[tuple[str, type]] | None:
    """gptqmodel's "auto" order of GPTQ kernels, (backend name, layer class); None where this
    gptqmodel keeps no such table (not gptqmodel 7)."""
    try:
        from gptqmodel.quantization import FORMAT, METHOD
        from gptqmodel.utils.importer import AUTO_BACKEND_KERNEL_MAPPING
        return [(backend.value, cls) for backend, cls in AUTO_BACKEND_KERNEL_MAPPING[METHOD.GPTQ][FORMAT.GPTQ].items()]
    except (ImportError, AttributeError, KeyError):
        return None


def _devices(cls: type) -> set[str]:
    return {getattr(d, "value", d) for d in getattr(cls, "SUPPORTS_DEVICES", ())}


def _after_machete() -> tuple[str, ...]:
    """The CUDA kernels "auto" would consider after Machete, in gptqmodel's own order (a new
    gptqmodel may add or reorder kernels); AFTER_MACHETE where that order cannot be read."""
    order = _auto_order()
    names = [name for name, _ in order or ()]
    if "gptq_machete" not in names:
        return AFTER_MACHETE
    return tuple(name for name, cls in order[names.index("gptq_machete") + 1:] if _devices(cls) & {"cuda", "all"})


def chosen_backend(kernel: str, stored: dict[str, Any], device: torch.device, training: bool,
                   setting: str) -> str:
    """gptqmodel's name for the kernel the user named in `setting` ("marlin": "gptq_marlin"),
    once gptqmodel accepts it for this model on `device`; else a ModelError that lists the
    kernels that do run here.

    Checked as transformers' GPTQ loading asks gptqmodel for it (no dtype: each kernel casts).
    Machete also needs its CUTLASS sources, which gptqmodel fetches only later, in the load.
    """
    backend = "gptq_" + kernel
    problem = _kernel_problem(backend, stored, device, None)
    if problem is None and kernel == "machete" and device.type == "cuda" and _machete_needs_sources(device):
        reason = _cutlass_missing()
        if reason is not None:
            problem = (f"it is built from the CUTLASS v4.7.1 sources, which could not be had ({reason}); set "
                       "GPTQMODEL_CUTLASS_DIR to a CUTLASS v4.7.1 checkout, or load once online")
    if problem is None:
        return backend
    choices = kernel_choices(training)
    fitting = [name for name in choices if name not in ("auto", kernel)
               and _kernel_problem("gptq_" + name, stored, device, None) is None]
    shape = f"{stored['bits']}-bit, group size {stored.get('group_size', 128)}"
    raise ModelError(f"{setting} is {kernel!r}, which gptqmodel cannot run on {device} for this model ({shape}): "
                     f"{problem}. Kernels that run it here: {', '.join(fitting) or 'none'}; or set {setting}: "
                     "auto (gptqmodel's own choice)")


def kernel_choices(training: bool) -> tuple[str, ...]:
    """The kernel names a config accepts: eval.gptq_kernel's, or train.gptq_kernel's (trainable)."""
    if training:
        from expert.train.config import TrainingKernel
        return get_args(TrainingKernel)
    from expert.evaluation.config import InferenceKernel
    return get_args(InferenceKernel)


def layer_kernel(model: torch.nn.Module) -> str | None:
    """The class name of gptqmodel's layers in `model` ("+"-joined if several), None without any.

    Kernels round differently, and "auto" picks by GPU generation and by what it can build, so
    evaluations and training record which one served them."""
    names = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")})
    return "+".join(names) or None


def aten_int4_fits(stored: dict[str, Any]) -> bool:
    """Whether torch's CPU int4 kernel (behind gptqmodel's TorchAtenLinear) takes this group size."""
    return stored["bits"] != 4 or stored.get("group_size") in _ATEN_INT4_GROUP_SIZES


def _machete_needs_sources(device: torch.device) -> bool:
    """Whether Machete runs on `device` (gptqmodel's own device check; "auto" then takes it) and
    would be built from the CUTLASS sources there, not taken prebuilt."""
    if os.environ.get("GPTQMODEL_MACHETE_PRECOMPILED_LIBRARY"):
        return False  # a prebuilt Machete needs no sources
    try:
        from gptqmodel.utils import machete
        return bool(machete._validate_machete_device_support(device))
    except (ImportError, AttributeError):  # another gptqmodel: leave the choice to it
        return False


def _cutlass_missing() -> str | None:
    """None when gptqmodel finds the CUTLASS sources (fetching them if it may), else why not."""
    if "cutlass" in _missing_sources:
        return _missing_sources["cutlass"]
    from huggingface_hub import is_offline_mode  # HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE

    if is_offline_mode():
        # gptqmodel's download (urlopen, no timeout) would hang behind a firewall that drops
        # packets: with this it only looks on disk. A user's own value wins.
        os.environ.setdefault("GPTQMODEL_OFFLINE", "1")
    from gptqmodel.utils import machete

    try:
        with _socket_timeout(NETWORK_TIMEOUT_S):
            machete._ensure_cutlass_source()
    except Exception as exc:  # URLError, offline RuntimeError, a bad GPTQMODEL_CUTLASS_DIR
        _missing_sources["cutlass"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        return _missing_sources["cutlass"]
    return None


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    """Sockets opened without a timeout of their own get `seconds`, unless one is already set."""
    before = socket.getdefaulttimeout()
    if before is None:
        socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(before)


def _kernel_fits(backend: str, stored: dict[str, Any], device: torch.device, dtype: torch.dtype) -> bool:
    """Whether gptqmodel takes `backend` for this model's bits, groups and dtype on `device`."""
    return _kernel_problem(backend, stored, device, dtype) is None


def _kernel_problem(backend: str, stored: dict[str, Any], device: torch.device,
                    dtype: torch.dtype | None) -> str | None:
    """None when gptqmodel takes `backend` for this model on `device` (and `dtype`, unless None),
    else gptqmodel's reason."""
    from gptqmodel.utils.importer import select_quant_linear

    if backend == "gptq_torch_aten" and device.type == "cpu" and not aten_int4_fits(stored):
        return f"torch's CPU int4 kernel takes group sizes {', '.join(map(str, _ATEN_INT4_GROUP_SIZES))} only"
    try:
        select_quant_linear(bits=stored["bits"], group_size=stored.get("group_size", 128),
                            desc_act=bool(stored.get("desc_act", False)), sym=bool(stored.get("sym", True)),
                            device=device, backend=backend, dtype=dtype, pack_dtype=torch.int32)
    except (ValueError, NotImplementedError, ImportError, RuntimeError) as exc:
        # gptqmodel names its classes in full ("<class '...tritonv2.TritonV2Linear'> does not ..."):
        # the class name says it.
        text = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", str(exc).splitlines()[0] if str(exc) else "")
        return text.rstrip(". ")[:300] or type(exc).__name__
    return None
