"""eval.gptq_kernel and train.gptq_kernel: the user names gptqmodel's kernel for a GPTQ model.

On the CPU, with the tiny 4-bit Llama: a named kernel is the one loaded (over EXPERT's own
choice), one that cannot run here fails before the load naming the setting and the kernels that
can, and the stages pass the setting down to the load."""

from __future__ import annotations

import pytest
import torch

from expert.errors import ConfigError, ModelError
from expert.evaluation import EvalConfig
from expert.gptq_kernel import layer_kernel
from expert.modeling import load_model
from expert.train import TrainConfig
from tests.expert.eval_fixtures import pubmedqa_dir  # noqa: F401
from tests.expert.quantize_fixtures import PROBE, tiny_setup


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_setup(tmp_path_factory)


def test_the_settings_take_gptqmodels_kernel_names_and_reject_others():
    assert EvalConfig(gptq_kernel="marlin").gptq_kernel == "marlin"
    assert TrainConfig(gptq_kernel="triton").gptq_kernel == "triton"
    with pytest.raises(ConfigError, match=r"eval\.gptq_kernel.*'marlin'"):
        EvalConfig.from_dict({"gptq_kernel": "marlim"}, where="eval")
    # Marlin has no backward: not a training kernel.
    with pytest.raises(ConfigError, match=r"train\.gptq_kernel.*'triton'"):
        TrainConfig.from_dict({"gptq_kernel": "marlin"}, where="train")


def test_auto_stays_out_of_the_cache_keys_and_a_named_kernel_goes_in():
    """Keys made before the setting existed stay valid; a named kernel rounds otherwise, so it
    gets its own evaluation and training."""
    assert "gptq_kernel" not in EvalConfig().canonical()
    assert "gptq_kernel" not in TrainConfig().canonical()
    assert EvalConfig(gptq_kernel="torch").canonical()["gptq_kernel"] == "torch"
    assert TrainConfig(gptq_kernel="torch").canonical()["gptq_kernel"] == "torch"


def test_a_named_inference_kernel_is_the_one_loaded(setup, monkeypatch):
    """In bf16 EXPERT keeps the dequantized weights with gptqmodel's torch kernel; named, the int4
    kernel is loaded instead, and gives the same model to bf16's rounding."""
    from expert import modeling

    monkeypatch.setattr(modeling, "available_memory", lambda: 1 << 40)  # room for the dense copy
    own, tok = load_model(setup.gptq, device="cpu", dtype="bfloat16")
    named, _ = load_model(setup.gptq, device="cpu", dtype="bfloat16", gptq_kernel="torch_aten")
    assert layer_kernel(own) == "TorchLinear" and layer_kernel(named) == "TorchAtenLinear"
    ids = tok(PROBE, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        diff = (own(input_ids=ids).logits.float() - named(input_ids=ids).logits.float()).abs()
    assert diff.mean() < 0.05 and diff.max() < 0.5, (diff.mean(), diff.max())  # as in test_modeling.py


def test_a_kernel_that_cannot_run_here_fails_before_the_load_with_the_ones_that_can(setup, monkeypatch):
    import transformers

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    with pytest.raises(ModelError) as caught:
        load_model(setup.gptq, device="cpu", gptq_kernel="marlin")
    message = str(caught.value)
    assert "eval.gptq_kernel is 'marlin'" in message and "requires CUDA" in message
    assert "4-bit, group size 32" in message
    assert "Kernels that run it here: torch, torch_fused, torch_aten" in message
    assert "eval.gptq_kernel: auto" in message

    with pytest.raises(ModelError, match=r"train\.gptq_kernel is 'triton'.*does not support device: cpu.*"
                                         r"Kernels that run it here: torch;"):
        load_model(setup.gptq, training=True, device="cpu", gptq_kernel="triton")


def test_torch_aten_is_refused_for_group_sizes_torchs_int4_kernel_lacks(setup, monkeypatch):
    """gptqmodel accepts them and the first forward fails: said before the load instead."""
    from expert import gptq_kernel

    stored = {"bits": 4, "group_size": 16, "desc_act": False, "sym": True}
    with pytest.raises(ModelError, match="takes group sizes 32, 64, 128, 256 only.*run it here: torch, torch_fused;"):
        gptq_kernel.chosen_backend("torch_aten", stored, torch.device("cpu"), False, "eval.gptq_kernel")
    assert gptq_kernel.chosen_backend("torch_aten", {**stored, "group_size": 32}, torch.device("cpu"), False,
                                      "eval.gptq_kernel") == "gptq_torch_aten"


def test_the_evaluation_and_the_training_pass_the_setting_to_the_load(setup, pubmedqa_dir, tmp_path):  # noqa: F811
    from expert.evaluation import evaluate
    from expert.train import train

    with pytest.raises(ModelError, match=r"eval\.gptq_kernel is 'exllama_v2'"):
        evaluate(EvalConfig(device="cpu", gptq_kernel="exllama_v2"), "pubmedqa", setup.gptq, pubmedqa_dir,
                 tmp_path / "eval")
    config = TrainConfig(gptq_kernel="triton", micro_batch_size=2, effective_batch_size=2, max_steps=1)
    with pytest.raises(ModelError, match=r"train\.gptq_kernel is 'triton'"):
        train(config, setup.gptq, setup.data, tmp_path / "train", tmp_path / "work", device="cpu")


def test_an_evaluation_records_the_kernel_that_scored_it(setup, pubmedqa_dir, tmp_path):  # noqa: F811
    """In one process and in pieces: 'auto' picks by GPU generation, so the report can say."""
    from expert.evaluation import evaluate
    from expert.fanout import InProcess

    config = EvalConfig(device="cpu", dtype="bfloat16", gptq_kernel="torch_aten", batch_size=4)
    whole = evaluate(config, "pubmedqa", setup.gptq, pubmedqa_dir, tmp_path / "whole")
    split = evaluate(config, "pubmedqa", setup.gptq, pubmedqa_dir, tmp_path / "split", fan_out=InProcess(2))
    assert whole["timing"]["gptq_kernel"] == split["timing"]["gptq_kernel"] == "TorchAtenLinear"
    plain = evaluate(config, "pubmedqa", setup.base, pubmedqa_dir, tmp_path / "plain")  # no GPTQ layers
    assert "gptq_kernel" not in plain["timing"]


def test_training_records_the_kernel_that_served_the_base(setup, tmp_path, caplog):
    """On the CPU the named torch kernel loads the base, which is then dequantized once (frozen.py):
    the log and summary.json say both."""
    import json
    import logging

    from expert.train import train

    config = TrainConfig(gptq_kernel="torch", micro_batch_size=2, effective_batch_size=2, max_steps=1,
                         dev_loss=False, save_every_steps=1)
    with caplog.at_level(logging.INFO, logger="expert.train"):
        train(config, setup.gptq, setup.data, tmp_path / "out", tmp_path / "work", device="cpu")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["gptq_kernel"] == "TorchLinear, dequantized once into frozen linear layers", summary
    assert "GPTQ base served by gptqmodel's TorchLinear, dequantized once" in caplog.text
    assert "(train.gptq_kernel torch)" in caplog.text
