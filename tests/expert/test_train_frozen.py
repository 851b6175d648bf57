"""Frozen linear weights stored in the autocast dtype (expert/train/frozen.py): bitwise the same training."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from expert.train.frozen import cast_frozen_linears
from expert.train.lean import make_lean
from tests.expert.test_train_lean import ids, loss_and_grads


def tiny(tied: bool, layers: int = 2) -> torch.nn.Module:
    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=layers, vocab_size=96, attn_implementation="sdpa",
                         tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                                target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # lora_B starts at zero; a non-zero B gives A real gradients
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.train()
    return model


def step(model):
    return loss_and_grads(model, ids(3, 17), autocast=True)  # seeded: the same dropout masks on both sides


@pytest.mark.parametrize("lean", [False, True], ids=["peft", "lean"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_under_autocast_the_loss_and_gradients_are_bitwise_those_of_casting_every_call(lean, tied):
    model = tiny(tied)
    if lean:
        make_lean(model)
    cast = copy.deepcopy(model)
    n = cast_frozen_linears(cast, torch.bfloat16)
    # 2 layers x 7 linear layers (q and v inside their LoRA wrappers), plus the head when it is its own
    assert n == 2 * 7 + (0 if tied else 1)
    for _ in range(2):  # twice: the second step reuses nothing the first one cached
        want, got = step(model), step(cast)
        assert torch.equal(got[0], want[0])
        assert got[1].keys() == want[1].keys() and want[1]
        for name in want[1]:
            assert torch.equal(got[1][name], want[1][name]), name


def test_only_frozen_plain_linear_weights_change_dtype():
    model = tiny(tied=True)
    cast_frozen_linears(model, torch.bfloat16)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert dtypes["base_model.model.model.layers.0.self_attn.k_proj.weight"] == torch.bfloat16
    assert dtypes["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"] == torch.bfloat16
    assert dtypes["base_model.model.model.layers.1.mlp.down_proj.weight"] == torch.bfloat16
    # trained LoRA weights, norms and the embeddings (which the tied head shares) stay float32
    assert dtypes["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"] == torch.float32
    assert dtypes["base_model.model.model.layers.0.input_layernorm.weight"] == torch.float32
    assert dtypes["base_model.model.model.embed_tokens.weight"] == torch.float32
    assert model.get_output_embeddings().weight.dtype == torch.float32


def test_without_autocast_nothing_changes_and_other_linear_kinds_are_left():
    class Quantized(torch.nn.Linear):  # as bitsandbytes' Linear4bit: a subclass whose weight is its own
        pass

    model = tiny(tied=False)
    assert cast_frozen_linears(model, None) == 0
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    holder = torch.nn.Sequential(Quantized(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    holder.requires_grad_(False)
    holder[2].weight.requires_grad_(True)  # a trained linear keeps its dtype: autocast caches its cast
    assert cast_frozen_linears(holder, torch.bfloat16) == 1
    assert [m.weight.dtype for m in holder] == [torch.float32, torch.bfloat16, torch.float32]


def test_a_bf16_training_run_ends_with_the_adapter_of_casting_every_call(tmp_path, monkeypatch):
    """Through train(): the same adapter bit for bit with the frozen weights stored in bf16 or cast
    by autocast on every call (the cast switched off), dropout on."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise comparisons need the same kernels
    try:
        _two_runs(tmp_path, monkeypatch)
    finally:
        torch.set_num_threads(threads)


def _two_runs(tmp_path, monkeypatch):
    import expert.train.loop as loop
    from safetensors.torch import load_file

    from expert.train import TrainConfig, train
    from tests.expert.train_fixtures import write_toy_data
    from tests.fixtures.models import tiny_llama_dir

    model_dir, data_dir = tiny_llama_dir(tmp_path / "llama"), write_toy_data(tmp_path / "data", 8, 2)
    config = TrainConfig(epochs=1, micro_batch_size=2, effective_batch_size=4, learning_rate=5e-3,
                         lora_dropout=0.1, precision="bfloat16", target_modules="all-linear")
    calls = []
    cast = loop.cast_frozen_linears

    def counted(model, dtype):
        calls.append(cast(model, dtype))
        return calls[-1]

    adapters = {}
    for name, fn in (("cast", counted), ("every call", lambda model, dtype: 0)):
        monkeypatch.setattr(loop, "cast_frozen_linears", fn)
        train(config, model_dir, data_dir, tmp_path / name / "out", tmp_path / name / "work", device="cpu")
        adapters[name] = load_file(tmp_path / name / "out" / "final" / "adapter_model.safetensors")
    assert calls and calls[0] > 0
    assert adapters["cast"].keys() == adapters["every call"].keys() and adapters["cast"]
    for key, value in adapters["cast"].items():
        assert torch.equal(value, adapters["every call"][key]), key


# ---------------------------------------------------------------- a GPTQ base on the CPU

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tests.expert.quantize_fixtures import tiny_setup

    return tiny_setup(tmp_path_factory)


def gptq_loss(model, amp: bool):
    ids = torch.randint(0, 96, (2, 21), generator=torch.Generator().manual_seed(5))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("amp", [False, True], ids=["float32", "bf16 autocast"])
def test_a_gptq_layer_dequantized_once_multiplies_as_the_kernel_does(setup, amp):
    from expert.modeling import load_model
    from expert.train.frozen import dense_gptq_bytes, dense_gptq_layers

    kernel, _ = load_model(setup.gptq, training=True, device="cpu")
    dense, _ = load_model(setup.gptq, training=True, device="cpu")
    dtype = torch.bfloat16 if amp else torch.float32
    layers = dense.config.num_hidden_layers * 7
    assert dense_gptq_bytes(dense, dtype) == sum(
        m.in_features * m.out_features * dtype.itemsize for m in kernel.modules() if type(m).__name__ == "TorchLinear")
    assert dense_gptq_layers(dense, dtype)[0] == layers
    assert not any(type(m).__name__ == "TorchLinear" for m in dense.modules())
    linears = [m for m in dense.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == layers and all(m.weight.dtype == dtype and not m.weight.requires_grad for m in linears)
    kernel.train(), dense.train()
    want, got = gptq_loss(kernel, amp), gptq_loss(dense, amp)
    torch.testing.assert_close(got, want, rtol=1e-6 if not amp else 1e-3, atol=0)


def test_training_on_a_gptq_base_dequantizes_it_once_where_it_fits(setup, tmp_path, monkeypatch, caplog):
    import logging

    import expert.modeling as modeling
    from expert.train import TrainConfig, train
    from tests.expert.train_fixtures import write_toy_data

    data = write_toy_data(tmp_path / "data", 8, 2)
    # No dropout: PEFT's GPTQ LoRA layer and the lean one on a plain linear layer draw other masks
    config = TrainConfig(epochs=1, micro_batch_size=2, effective_batch_size=4, learning_rate=5e-3,
                         precision="float32", dev_loss=False, lora_dropout=0.0)
    results = {}
    for name, memory in (("dense", 1 << 40), ("4-bit", 0)):
        monkeypatch.setattr(modeling, "available_memory", lambda memory=memory: memory)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="expert.train"):
            results[name] = train(config, setup.gptq, data, tmp_path / name / "out", tmp_path / name / "work",
                                  device="cpu")
        said = "dequantized once" if name == "dense" else "kept 4-bit"
        assert said in caplog.text, caplog.text
    # the same weights multiplied: the same training to float32 rounding
    assert results["dense"]["final_loss"] == pytest.approx(results["4-bit"]["final_loss"], rel=1e-5)
