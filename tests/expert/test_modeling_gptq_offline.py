"""GPTQ loads without internet: gptqmodel 7.6 checks its Machete kernel (Hopper GPUs) by
downloading CUTLASS outside the try that turns a failure into "kernel unavailable", so a
URLError escaped from_pretrained. These tests replay that check on the CPU, with no network."""

from __future__ import annotations

import logging
import os
import urllib.error

import pytest
from transformers import AutoModelForCausalLM

from expert.modeling import load_model
from tests.expert.quantize_fixtures import tiny_setup


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_setup(tmp_path_factory)


@pytest.fixture
def machete(monkeypatch, tmp_path):
    """gptqmodel's real CUTLASS lookup, with an empty cache and a network that cannot resolve names;
    from_pretrained runs it first, as gptqmodel's kernel selection does on a Hopper GPU."""
    from gptqmodel.utils import machete as module

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "GPTQMODEL_CUTLASS_DIR"):
        monkeypatch.delenv(name, raising=False)
    # The loader sets GPTQMODEL_OFFLINE in os.environ: setenv first, so that it is undone after.
    monkeypatch.setenv("GPTQMODEL_OFFLINE", "0")
    monkeypatch.delenv("GPTQMODEL_OFFLINE")
    monkeypatch.setenv("GPTQMODEL_CACHE_DIR", str(tmp_path / "gptqmodel-cache"))
    monkeypatch.setattr(module, "_repo_local_cutlass_root", lambda: tmp_path / "no-cutlass")
    urls = []

    def urlopen(url, *args, **kwargs):
        urls.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(module.urllib.request, "urlopen", urlopen)
    real = AutoModelForCausalLM.from_pretrained
    calls = []

    def from_pretrained(*args, **kwargs):
        calls.append(args)
        try:
            module._ensure_cutlass_source()
        except RuntimeError:  # Machete unavailable: gptqmodel falls back to another kernel
            pass
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    return {"urls": urls, "calls": calls, "patch": monkeypatch}


def test_a_failed_cutlass_download_retries_offline(setup, machete, caplog):
    with caplog.at_level(logging.WARNING, logger="expert.modeling"):
        model, _ = load_model(setup.gptq, device="cpu")
    assert model is not None
    assert len(machete["urls"]) == 1 and len(machete["calls"]) == 2
    assert os.environ.get("GPTQMODEL_OFFLINE") == "1"
    (record,) = [r for r in caplog.records if r.name == "expert.modeling" and r.levelno == logging.WARNING]
    message = record.getMessage()
    assert "CUTLASS" in message and "name resolution" in message and "GPTQMODEL_CUTLASS_DIR" in message
    # Later loads in the process do not try the network again.
    load_model(setup.gptq, device="cpu")
    assert len(machete["urls"]) == 1


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_declared_offline_never_tries_the_network(setup, machete, variable):
    machete["patch"].setenv(variable, "True")
    load_model(setup.gptq, device="cpu")
    assert machete["urls"] == [] and len(machete["calls"]) == 1
    assert os.environ.get("GPTQMODEL_OFFLINE") == "1"


def test_a_users_gptqmodel_offline_value_wins(setup, machete):
    machete["patch"].setenv("HF_HUB_OFFLINE", "1")
    machete["patch"].setenv("GPTQMODEL_OFFLINE", "no")
    load_model(setup.gptq, device="cpu")  # downloads, fails, retries with GPTQMODEL_OFFLINE=1
    assert len(machete["urls"]) == 1 and len(machete["calls"]) == 2
    assert os.environ.get("GPTQMODEL_OFFLINE") == "1"


def test_other_os_errors_propagate(setup, machete, monkeypatch):
    calls = []

    def broken(*args, **kwargs):
        calls.append(args)
        raise OSError("disk gone")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", broken)
    with pytest.raises(OSError, match="disk gone"):
        load_model(setup.gptq, device="cpu")
    assert len(calls) == 1 and "GPTQMODEL_OFFLINE" not in os.environ
