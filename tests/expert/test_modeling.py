"""The shared loader: plain, GPTQ, nf4 and none folders, adapters, errors, and the two silent
CPU traps that leave LoRA without gradients after an eval forward under no_grad."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

from expert import modeling
from expert.errors import ModelError
from expert.gptq_kernel import aten_int4_fits
from expert.modeling import RECORD_FILE, load_model, model_kind, resolve_base
from tests.expert.quantize_fixtures import PROBE, logits, tiny_setup

LORA_TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_setup(tmp_path_factory)


@pytest.fixture(scope="module")
def nf4_dir(setup, tmp_path_factory):
    """An nf4 record, or a skip saying why bitsandbytes 4-bit cannot run on this machine.

    The skip asks bitsandbytes alone (a 4-bit round trip on the CPU), so that a failure of our
    loader is a failure, not a skip.
    """
    functional = pytest.importorskip("bitsandbytes.functional")
    try:
        packed, state = functional.quantize_4bit(torch.randn(64, 64), quant_type="nf4")
        functional.dequantize_4bit(packed, state)
    except Exception as exc:  # bitsandbytes without a CPU backend raises various types
        pytest.skip(f"bitsandbytes nf4 cannot run on this CPU: {exc}")
    out = tmp_path_factory.mktemp("nf4")
    (out / RECORD_FILE).write_text(json.dumps({"method": "nf4", "base_model": str(setup.base)}))
    return out


def test_plain_folder_loads_in_float32_eval_mode(setup):
    model, tok = load_model(setup.base)
    assert model_kind(setup.base) == "plain" and resolve_base(setup.base) == setup.base
    assert model.dtype == torch.float32 and not model.training and tok.eos_token == "<|im_end|>"


def test_gptq_folder_is_recognized(setup):
    assert model_kind(setup.gptq) == "gptq" and resolve_base(setup.gptq) == setup.gptq


@pytest.mark.parametrize("kind", ["gptq", "nf4"])
def test_lora_gets_gradients_after_an_eval_forward(kind, setup, request):
    """The pipeline scores (eval, no_grad) and trains the same kind of model: a training step
    after a scoring pass must still reach every LoRA weight, and the loss must fall."""
    folder = setup.gptq if kind == "gptq" else request.getfixturevalue("nf4_dir")
    model, tok = load_model(folder, training=True)
    losses, grads = _eval_then_train(model, tok)
    assert all(g > 0 for g in grads.values()), grads
    assert losses[-1] < losses[0], losses


def test_a_gptq_load_with_lora_prints_no_known_harmless_warning(setup, tmp_path):
    """Two warnings every stage's log showed, neither about the run: transformers' "the
    `quantization_config` from the model will be used" (the loader passes loading options only,
    which it merges, as meant) and the `is_gradient_checkpointing` deprecation PEFT's wrapping
    reads. Through training's LoRA wrapping and the loader's adapter; any other warning still shows."""
    from expert.train.config import TrainConfig
    from expert.train.lora import attach_lora

    with warnings.catch_warnings(record=True) as caught:  # and forgets what was shown before
        model, _ = load_model(setup.gptq, training=True)
        attach_lora(model, TrainConfig(target_modules=["q_proj"])).save_pretrained(tmp_path / "adapter")
        load_model(setup.gptq, adapter_dir=tmp_path / "adapter")
        warnings.warn("a warning of any other kind", UserWarning)
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "quantization_config" in m or "is_gradient_checkpointing" in m], messages
    assert "a warning of any other kind" in messages


def test_gptq_on_the_cpu_compiles_nothing(setup):
    """gptqmodel compiles each torch-kernel layer's dequantization by default; on the CPU that
    bought nothing, and its eval path recompiled layer after layer (see _eager_gptq_dequant)."""
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from torch._dynamo.utils import counters

    before = TorchLinear.optimize
    counters.clear()
    model, tok = load_model(setup.gptq, training=True, device="cpu")
    assert any(isinstance(m, TorchLinear) for m in model.modules())  # the kernel this is about
    _eval_then_train(model, tok, steps=1)  # an eval forward under no_grad, then a training step
    assert counters["stats"].get("unique_graphs", 0) == 0, dict(counters["stats"])
    assert TorchLinear.optimize is before  # the class is as it was for any later load


def test_gptq_trap_is_real_without_training_settings(setup):
    """Control for the test above: loaded for inference with gptqmodel's int4 CPU kernel (its own
    "auto" choice), it latches into its no-grad int4 path on the eval forward, and LoRA upstream
    of it gets no gradient."""
    model, tok = load_model(setup.gptq, gptq_kernel="torch_aten")
    _, grads = _eval_then_train(model, tok, steps=1)
    assert any(g == 0 for g in grads.values()), grads


def test_nf4_trap_is_real_without_the_flag(setup):
    """Control for the nf4 case: stock bitsandbytes on an AVX512-BF16 CPU repacks on the eval
    forward into a no-grad path: LoRA upstream of a repacked layer gets no gradient."""
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if not bnb.nn.Linear4bit(4, 4).support_avx512bf16_for_cpu:
        pytest.skip("this CPU lacks AVX512-BF16: bitsandbytes never repacks here")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(setup.base, quantization_config=config, device_map="cpu")
    _, tok = load_model(setup.base)
    _, grads = _eval_then_train(model, tok, steps=1)
    assert any(g == 0 for g in grads.values()), grads


def test_adapter_is_attached_trainable_only_for_training(setup, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, tok = load_model(setup.base)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    expected = logits(peft_model, tok)
    for training in (False, True):
        loaded, _ = load_model(setup.gptq if training else setup.base, adapter_dir=tmp_path / "adapter",
                               training=training)
        trainable = [n for n, p in loaded.named_parameters() if p.requires_grad]
        assert bool(trainable) == training and all("lora_" in n for n in trainable)
    loaded, _ = load_model(setup.base, adapter_dir=tmp_path / "adapter")
    assert torch.allclose(logits(loaded, tok), expected)


def test_errors_name_the_folder_and_the_fix(setup, tmp_path):
    with pytest.raises(ModelError, match="does not exist; run the import stage"):
        load_model(tmp_path / "missing")
    (tmp_path / "moved").mkdir()
    (tmp_path / "moved" / RECORD_FILE).write_text(json.dumps({"method": "nf4", "base_model": "../gone"}))
    with pytest.raises(ModelError, match="moved or deleted: rerun the import stage"):
        load_model(tmp_path / "moved")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / RECORD_FILE).write_text(json.dumps({"method": "awq"}))
    with pytest.raises(ModelError, match="must hold 'method'"):
        resolve_base(tmp_path / "bad")
    with pytest.raises(ModelError, match="lacks adapter_config.json"):
        load_model(setup.base, adapter_dir=tmp_path)


def _quant_layers(model):
    return [m for m in model.modules() if getattr(m, "qweight", None) is not None]


def test_gptq_scoring_in_bf16_on_the_cpu_keeps_the_dequantized_weights(setup, monkeypatch):
    """Scoring in bf16 on a CPU: gptqmodel's torch kernel keeps each layer's dequantized weights
    from the first forward on (dense matmuls after that), computing what the same kernel computes
    without the cache, bit for bit; only for that load (training loads do not cache)."""
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    monkeypatch.delenv("GPTQ_TORCH_CACHE_WEIGHTS", raising=False)
    monkeypatch.setattr(modeling, "available_memory", lambda: 1 << 40)  # whatever this machine has free
    model, tok = load_model(setup.gptq, device="cpu", dtype="bfloat16")
    layers = _quant_layers(model)
    assert layers and all(type(m) is TorchLinear and m._cache_enabled for m in layers)
    assert "GPTQ_TORCH_CACHE_WEIGHTS" not in os.environ  # set for that load only
    with torch.inference_mode():
        first, second = logits(model, tok), logits(model, tok)
        assert all(m._cached_weights for m in layers) and torch.equal(first, second)
        for m in layers:  # the same kernel dequantizing on every call
            m._cache_enabled = False
            m.clear_weight_cache()
        assert torch.equal(logits(model, tok), first)

    # No room for the copy: gptqmodel's int4 kernel, the same model to bf16's rounding (on this
    # random tiny model either kernel in bf16 is ~0.2 at most from the torch kernel in float32).
    monkeypatch.setattr(modeling, "available_memory", lambda: 0)
    int4, _ = load_model(setup.gptq, device="cpu", dtype="bfloat16")
    assert all(type(m).__name__ == "TorchAtenLinear" for m in _quant_layers(int4))
    with torch.inference_mode():
        diff = (logits(int4, tok).float() - first.float()).abs()
    assert diff.mean() < 0.05 and diff.max() < 0.5, (diff.mean(), diff.max())
    monkeypatch.undo()
    trained, _ = load_model(setup.gptq, training=True, device="cpu", dtype="bfloat16")
    assert not any(getattr(m, "_cache_enabled", False) for m in _quant_layers(trained))


def test_float32_scoring_of_a_gptq_model_on_the_cpu_computes_in_float32(setup):
    """gptqmodel's "auto" CPU kernel (int4 ATen) multiplies in bf16 whatever it is given; a float32
    evaluation takes the plain torch kernel and gets the float32 sums of the dequantized weights
    that training multiplies by (expert/train/frozen.py)."""
    from expert.train.frozen import dense_gptq_layers

    scored, tok = load_model(setup.gptq, device="cpu", dtype="float32")
    assert {type(m).__name__ for m in _quant_layers(scored)} == {"TorchLinear"}
    dense, _ = load_model(setup.gptq, training=True, device="cpu", dtype="float32")
    assert dense_gptq_layers(dense, torch.float32)[0] == len(_quant_layers(scored))
    dense.eval()
    want = logits(dense, tok)
    exact = (logits(scored, tok) - want).abs().max().item()
    aten, _ = load_model(setup.gptq, device="cpu", dtype="float32", gptq_kernel="torch_aten")
    rounded = (logits(aten, tok) - want).abs().max().item()
    assert exact < 1e-5 and rounded > 100 * exact, (exact, rounded)


def test_gptq_dense_cache_only_in_bf16_and_within_memory(setup, monkeypatch):
    dense = modeling._gptq_dense_bytes(setup.gptq)
    layers = sum(m.in_features * m.out_features for m in _quant_layers(load_model(setup.gptq)[0]))
    assert dense == 2 * layers  # 16 bits per weight, read from the checkpoint's headers alone
    cpu = torch.device("cpu")
    monkeypatch.setattr(modeling, "available_memory", lambda: 2 * dense)
    assert modeling._gptq_dense_cache_fits(setup.gptq, cpu, torch.bfloat16)
    assert not modeling._gptq_dense_cache_fits(setup.gptq, cpu, torch.float32)  # the torch kernel, uncached
    assert not modeling._gptq_dense_cache_fits(setup.gptq, cpu, torch.float16)  # emulated on CPUs, unmeasured
    assert not modeling._gptq_dense_cache_fits(setup.gptq, torch.device("cuda"), torch.bfloat16)
    monkeypatch.setattr(modeling, "available_memory", lambda: 2 * dense - 1)
    assert not modeling._gptq_dense_cache_fits(setup.gptq, cpu, torch.bfloat16)


def test_available_memory_reads_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n")
    assert modeling.available_memory(str(meminfo)) == 20000000 * 1024
    assert modeling.available_memory(str(tmp_path / "missing")) == 0


@pytest.mark.parametrize("bits, group_size, fits", [
    (4, 32, True), (4, 64, True), (4, 256, True), (4, 16, False), (4, -1, False), (8, 16, True),
])
def test_cpu_int4_kernel_group_sizes(bits, group_size, fits):
    assert aten_int4_fits({"bits": bits, "group_size": group_size}) == fits


def _eval_then_train(model, tok, steps: int = 5) -> tuple[list[float], dict[str, float]]:
    """An eval forward under no_grad (a scoring pass), then `steps` LoRA training steps.

    Returns the losses and the gradient magnitude of every LoRA weight after the first step.
    LoRA B starts non-zero so that A's gradient is non-zero too when everything works.
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS,
                                             init_lora_weights=False))
    ids = tok(PROBE, return_tensors="pt")["input_ids"]
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    optimizer = torch.optim.Adam(lora.values(), lr=1e-2)
    losses, grads = [], {}
    for step in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if step == 0:
            grads = {n: (0.0 if p.grad is None else p.grad.abs().sum().item()) for n, p in lora.items()}
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, grads
