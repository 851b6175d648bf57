"""Which gptqmodel kernel serves a GPTQ model's inference on a CUDA GPU, when "auto" cannot.

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
import socket
from typing import Any

import torch

log = logging.getLogger(__name__)

# gptqmodel 7.6's "auto" order on CUDA after Machete (Swordfish, before it, is Blackwell-only).
AFTER_MACHETE = ("gptq_marlin", "gptq_exllama_v2", "gptq_triton", "gptq_torch")
# Per process: why the CUTLASS sources could not be had, so that later loads do not try again.
_missing_sources: dict[str, str] = {}
# gptqmodel downloads with urlopen and no timeout: behind a firewall that drops packets it would
# wait forever. A stalled connect or read fails after this many seconds instead.
NETWORK_TIMEOUT_S = 60


def inference_backend(stored: dict[str, Any], device: torch.device, dtype: torch.dtype) -> str:
    """"auto", or the kernel after Machete when Machete would be picked without its sources.

    stored: the model's `quantization_config` from config.json.
    """
    if device.type != "cuda" or not _machete_picked(device):
        return "auto"
    reason = _cutlass_missing()
    if reason is None:
        return "auto"
    backend = next((name for name in AFTER_MACHETE if _kernel_fits(name, stored, device, dtype)), "gptq_torch")
    log.warning("gptqmodel's Machete kernel (Hopper GPUs) is built from the CUTLASS v4.7.1 sources, "
                "which could not be had (%s); EXPERT loads the GPTQ model with %s instead. To use "
                "Machete, set GPTQMODEL_CUTLASS_DIR to a CUTLASS v4.7.1 checkout, or load once online "
                "(gptqmodel then caches the sources in GPTQMODEL_CACHE_DIR, by default "
                "~/.cache/gptqmodel)", reason, backend)
    return backend


def _machete_picked(device: torch.device) -> bool:
    """Whether "auto" would take Machete on `device` (gptqmodel's own device check)."""
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
    from gptqmodel.utils.importer import select_quant_linear

    try:
        select_quant_linear(bits=stored["bits"], group_size=stored.get("group_size", 128),
                            desc_act=bool(stored.get("desc_act", False)), sym=bool(stored.get("sym", True)),
                            device=device, backend=backend, dtype=dtype, pack_dtype=torch.int32)
    except (ValueError, NotImplementedError, ImportError, RuntimeError):
        return False
    return True
