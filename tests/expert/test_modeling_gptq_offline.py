"""GPTQ inference on a Hopper GPU without internet: gptqmodel's "auto" picks Machete, whose
CUTLASS sources are downloaded in the layers' post_init, after the choice; offline that fails the
whole load (found on an H100). These tests replay gptqmodel's real CUTLASS lookup on the CPU with
an empty cache and a network that cannot resolve names, and a Hopper GPU said to be present."""

from __future__ import annotations

import logging
import os
import socket
import urllib.error

import pytest
import torch

from expert import gptq_kernel
from expert.modeling import _gptq_loading_config, load_model
from tests.expert.quantize_fixtures import tiny_setup

CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_setup(tmp_path_factory)


@pytest.fixture
def hopper(monkeypatch, tmp_path):
    """A Hopper GPU as gptqmodel's device check sees it, no CUTLASS on disk, no network, and a
    kernel check that takes the named CUDA kernels (the CPU has none)."""
    from gptqmodel.utils import importer
    from gptqmodel.utils import machete as module

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for name in ("GPTQMODEL_CUTLASS_DIR", "GPTQMODEL_MACHETE_PRECOMPILED_LIBRARY"):
        monkeypatch.delenv(name, raising=False)
    # The loader may set GPTQMODEL_OFFLINE in os.environ: setenv first, so that it is undone after.
    monkeypatch.setenv("GPTQMODEL_OFFLINE", "0")
    monkeypatch.delenv("GPTQMODEL_OFFLINE")
    monkeypatch.setenv("GPTQMODEL_CACHE_DIR", str(tmp_path / "gptqmodel-cache"))
    monkeypatch.setattr(module, "_repo_local_cutlass_root", lambda: tmp_path / "no-cutlass")
    monkeypatch.setattr(module, "_validate_machete_device_support", lambda device=None: device.type == "cuda")
    monkeypatch.setattr(gptq_kernel, "_missing_sources", {})
    urls, asked = [], []

    def urlopen(url, *args, **kwargs):
        urls.append((url, socket.getdefaulttimeout()))
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    fits = {"gptq_marlin", "gptq_exllama_v2", "gptq_triton", "gptq_torch"}

    real = importer.select_quant_linear

    def select_quant_linear(*args, **kwargs):
        if args or kwargs.get("device") != CUDA:  # gptqmodel's own choice on the CPU
            return real(*args, **kwargs)
        asked.append(kwargs["backend"])
        if kwargs["backend"] not in fits:
            raise ValueError(f"{kwargs['backend']} does not fit")

    monkeypatch.setattr(module.urllib.request, "urlopen", urlopen)
    monkeypatch.setattr(importer, "select_quant_linear", select_quant_linear)
    return {"urls": urls, "asked": asked, "fits": fits, "patch": monkeypatch, "machete": module}


def declare_offline(hopper):
    """HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE=1), as huggingface_hub read it at import."""
    import huggingface_hub.constants

    hopper["patch"].setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def backend(setup, device=CUDA, training=False):
    return _gptq_loading_config(setup.gptq, device, torch.float16, training).backend


def test_a_failed_cutlass_download_takes_the_next_kernel_and_says_how_to_get_machete(setup, hopper, caplog):
    with caplog.at_level(logging.WARNING, logger="expert.gptq_kernel"):
        assert backend(setup) == "gptq_marlin"
    # gptqmodel's urlopen has no timeout: a firewall that drops packets must not hang the load.
    assert [timeout for _, timeout in hopper["urls"]] == [gptq_kernel.NETWORK_TIMEOUT_S]
    assert socket.getdefaulttimeout() is None
    (record,) = [r for r in caplog.records if r.name == "expert.gptq_kernel"]
    message = record.getMessage()
    assert "name resolution" in message and "gptq_marlin" in message
    assert "GPTQMODEL_CUTLASS_DIR" in message and "GPTQMODEL_CACHE_DIR" in message
    # Later loads in the process do not try the network again.
    assert backend(setup) == "gptq_marlin"
    assert len(hopper["urls"]) == 1


def test_the_next_kernel_is_the_first_that_fits_the_model(setup, hopper):
    hopper["fits"].discard("gptq_marlin")
    assert backend(setup) == "gptq_exllama_v2"
    assert hopper["asked"] == ["gptq_marlin", "gptq_exllama_v2"]


def test_the_kernels_after_machete_follow_gptqmodels_own_order(setup, hopper):
    from gptqmodel.utils import importer

    # gptqmodel 7.6's order: BitBLAS comes after Triton (it needs the bitblas package).
    assert gptq_kernel._after_machete() == ("gptq_marlin", "gptq_exllama_v2", "gptq_triton", "gptq_bitblas",
                                            "gptq_torch")
    # A gptqmodel that puts Triton before ExLlamaV2 (and drops Marlin) is followed, not 7.6's list.
    table = importer.AUTO_BACKEND_KERNEL_MAPPING
    (method, formats), = [(m, f) for m, f in table.items() if getattr(m, "value", m) == "gptq"]
    (fmt, order), = [(f, o) for f, o in formats.items() if getattr(f, "value", f) == "gptq"]
    names = {getattr(b, "value", b): b for b in order}
    shuffled = {names[n]: order[names[n]] for n in ("gptq_torch_aten", "gptq_machete", "gptq_triton",
                                                     "gptq_exllama_v2", "gptq_torch")}
    hopper["patch"].setitem(formats, fmt, shuffled)
    assert backend(setup) == "gptq_triton"
    assert hopper["asked"] == ["gptq_triton"]
    hopper["fits"].discard("gptq_triton")
    assert backend(setup) == "gptq_exllama_v2"
    # Without a table to read, 7.6's order.
    hopper["patch"].delitem(formats, fmt)
    assert gptq_kernel._after_machete() == gptq_kernel.AFTER_MACHETE


def test_declared_offline_never_tries_the_network(setup, hopper):
    declare_offline(hopper)
    assert backend(setup) == "gptq_marlin"
    assert hopper["urls"] == []
    assert os.environ.get("GPTQMODEL_OFFLINE") == "1"


def test_a_users_gptqmodel_offline_value_wins(setup, hopper):
    declare_offline(hopper)
    hopper["patch"].setenv("GPTQMODEL_OFFLINE", "no")
    assert backend(setup) == "gptq_marlin"  # downloads, and fails
    assert len(hopper["urls"]) == 1 and os.environ["GPTQMODEL_OFFLINE"] == "no"


def test_cutlass_at_hand_keeps_auto(setup, hopper, tmp_path):
    hopper["patch"].setattr(hopper["machete"], "_ensure_cutlass_source", lambda: tmp_path)
    assert backend(setup) == "auto"
    assert hopper["asked"] == []


def test_a_prebuilt_machete_keeps_auto_without_looking_for_sources(setup, hopper, tmp_path):
    hopper["patch"].setenv("GPTQMODEL_MACHETE_PRECOMPILED_LIBRARY", str(tmp_path / "machete.so"))
    assert backend(setup) == "auto"
    assert hopper["urls"] == []


def test_gpus_without_machete_cpus_and_training_never_look_for_cutlass(setup, hopper):
    hopper["patch"].setattr(hopper["machete"], "_validate_machete_device_support", lambda device=None: False)
    assert backend(setup) == "auto"  # an A100, say: auto picks Marlin itself
    assert hopper["asked"] == []
    assert backend(setup, training=True) == "gptq_triton"  # see below
    assert hopper["urls"] == []


def test_a_cpu_load_is_untouched(setup, hopper):
    model, _ = load_model(setup.gptq, device="cpu")
    assert model is not None
    assert hopper["urls"] == [] and hopper["asked"] == []


def named(setup, kernel, training=False):
    return _gptq_loading_config(setup.gptq, CUDA, torch.float16, training, kernel=kernel).backend


def test_a_named_kernel_is_taken_as_named_without_looking_for_cutlass(setup, hopper):
    """eval.gptq_kernel: marlin on a Hopper GPU offline: Marlin, with no download tried."""
    assert named(setup, "marlin") == "gptq_marlin"
    assert named(setup, "triton", training=True) == "gptq_triton"
    assert hopper["urls"] == [] and hopper["asked"] == ["gptq_marlin", "gptq_triton"]


def test_machete_named_without_its_sources_fails_before_the_load_saying_how_to_get_them(setup, hopper):
    from expert.errors import ModelError

    hopper["fits"].add("gptq_machete")
    with pytest.raises(ModelError) as caught:
        named(setup, "machete")
    message = str(caught.value)
    assert "eval.gptq_kernel is 'machete'" in message and "URLError" in message
    assert "GPTQMODEL_CUTLASS_DIR" in message
    # The kernels that fit (the fixture's), in the setting's order.
    assert "Kernels that run it here: marlin, exllama_v2, triton, torch;" in message


def test_gpu_training_names_the_trainable_kernel_without_checking_the_others(setup, hopper):
    """gptqmodel's "auto_trainable" runs each kernel's one-off check, which builds its extension,
    before asking whether it trains: ExLlamaV2 was built for 30 s on an H200 for a model then
    trained with Triton. Only the kernels that train on a GPU are checked, in gptqmodel's order."""
    from gptqmodel.quantization import FORMAT, METHOD
    from gptqmodel.utils.importer import AUTO_BACKEND_KERNEL_MAPPING

    order = [(b.value, c.SUPPORTS_TRAINING) for b, c in AUTO_BACKEND_KERNEL_MAPPING[METHOD.GPTQ][FORMAT.GPTQ].items()]
    # Why: kernels that cannot train come first in gptqmodel's order (the one built was ExLlamaV2).
    assert order.index(("gptq_exllama_v2", False)) < order.index(("gptq_triton", True))
    assert backend(setup, training=True) == "gptq_triton"
    assert hopper["asked"] == ["gptq_triton"]  # not the CPU-only ones, not those that cannot train
    hopper["fits"].discard("gptq_triton")  # no Triton on that machine, say
    assert backend(setup, training=True) == "gptq_torch"
    hopper["fits"].discard("gptq_torch")
    assert backend(setup, training=True) == "auto_trainable"  # gptqmodel's own error, then
    assert hopper["asked"] == ["gptq_triton", "gptq_triton", "gptq_torch", "gptq_triton", "gptq_torch"]
