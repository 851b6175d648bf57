"""train.compile (expert/train/compiling.py): each decoder layer compiled, the same training math.

Compiling takes seconds per test on the CPU; the tests share shapes so the compiled code is reused.
"""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch._dynamo.utils import counters

from expert.errors import ConfigError
from expert.train import TrainConfig, train
from expert.train.compiling import _check_backend, compile_decoder_layers
from expert.train.lean import make_lean
from expert.train.recompute import set_checkpointing
from tests.expert.test_train_lean import assert_grads_close, ids, tiny_lora
from tests.expert.train_fixtures import llama_dir, one_thread, write_toy_data  # noqa: F401 (fixtures)

CPU = torch.device("cpu")


def _has_cpp_compiler() -> bool:
    try:
        _check_backend(CPU)  # the option's own check
        return True
    except ConfigError:
        return False


# torch.compile on the CPU generates C++: a machine without a compiler cannot run these (the
# option's refusal there is tested below).
needs_compiler = pytest.mark.skipif(not _has_cpp_compiler(), reason="no C++ compiler for torch.compile on the CPU")


def loss_and_grads(model, batch, seed: int = 5):
    torch.manual_seed(seed)
    loss = model(input_ids=batch, labels=batch, use_cache=False).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def lean_model(dropout: float, checkpointing: bool = False, layers: int | None = None):
    model = tiny_lora(dropout)
    make_lean(model)
    set_checkpointing(model, checkpointing, layers)  # layers: how many recompute, the first ones
    model.train()
    return model


def graph_breaks() -> dict:
    return dict(counters["graph_break"])


@needs_compiler
def test_compiled_layers_give_the_eager_loss_and_gradients():
    counters.clear()
    batch = ids(2, 12)
    want = loss_and_grads(lean_model(0.0), batch)
    model = lean_model(0.0)
    assert compile_decoder_layers(model, CPU) == ["model.layers.0", "model.layers.1"]
    got = loss_and_grads(model, batch)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=0)
    assert_grads_close(got[1], want[1], rtol=1e-4, atol=1e-7)
    # Another width and batch size: dynamic shapes, the same code; still the eager numbers.
    other = ids(3, 17)
    torch.testing.assert_close(loss_and_grads(model, other)[0], loss_and_grads(lean_model(0.0), other)[0],
                               rtol=1e-5, atol=0)
    assert graph_breaks() == {}  # a break would split each layer and hand its pieces back to Python


@needs_compiler
def test_the_layers_share_their_compiled_code():
    """60 layers on the 33B shape must not mean 60 compilations: the layers run the same code, so
    two graphs serve all (the first layer, whose input needs no grad, and every other)."""
    torch._dynamo.reset()  # count from nothing: code compiled by an earlier test would be reused
    counters.clear()
    model = tiny_lora(0.1, layers=4)
    make_lean(model)
    model.train()
    assert len(compile_decoder_layers(model, CPU)) == 4
    loss_and_grads(model, ids(2, 12))
    assert counters["stats"]["unique_graphs"] == 2 and graph_breaks() == {}


@needs_compiler
def test_compiled_dropout_is_drawn_again_alike_in_the_checkpointed_recompute():
    """With dropout, the masks come from the compiler's generator: not the eager run's, but seeded,
    and the backward of a checkpointed layer (its forward recomputed) must see the same masks as
    the forward did, or the gradient would belong to another network. Also with only the first
    layer checkpointed (the two variants of the one compiled code side by side)."""
    counters.clear()
    batch = ids(2, 12)
    runs = {}
    for checkpointing, layers in ((False, None), (True, None), (True, 1)):
        model = lean_model(0.1, checkpointing, layers)
        compile_decoder_layers(model, CPU)
        runs[checkpointing, layers] = loss_and_grads(model, batch)
    for setting in ((True, None), (True, 1)):
        assert torch.equal(runs[setting][0], runs[False, None][0]), setting
        for name in runs[False, None][1]:
            assert torch.equal(runs[setting][1][name], runs[False, None][1][name]), (setting, name)
    again = loss_and_grads(model, batch)  # the last model's
    assert torch.equal(again[0], runs[True, 1][0])  # seeded: a run repeats itself
    no_dropout = lean_model(0.0, checkpointing=True)
    compile_decoder_layers(no_dropout, CPU)
    assert not torch.equal(loss_and_grads(no_dropout, batch)[0], runs[True, None][0])  # the dropout is real
    assert graph_breaks() == {}


def saved_for_backward(model, batch, seed: int = 5) -> tuple[int, tuple]:
    """Bytes the forward keeps for the backward (parameters aside), and loss_and_grads' result."""
    kept = [0]

    def pack(tensor):
        if not isinstance(tensor, torch.nn.Parameter):
            kept[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = loss_and_grads(model, batch, seed)
    return kept[0], result


@needs_compiler
def test_a_memory_budget_keeps_less_for_the_backward_and_the_same_gradients():
    """train.compile_memory_budget: the compiler recomputes in the backward what it no longer keeps.
    With dropout on, the masks must be the ones the forward drew: the gradients are the same bit for
    bit. Each budget is a compile of its own, in one process: the code compiled with the previous
    budget must not be reused."""
    batch = ids(2, 12)
    runs = {}
    for budget in (1.0, 0.2):
        model = lean_model(0.1)
        compile_decoder_layers(model, CPU, memory_budget=budget)
        runs[budget] = saved_for_backward(model, batch)
    (full, want), (budgeted, got) = runs[1.0], runs[0.2]
    assert budgeted < 0.7 * full, (budgeted, full)  # without a new compile: equal, the first code reused
    assert torch.equal(got[0], want[0])
    assert all(torch.equal(got[1][name], want[1][name]) for name in want[1])
    assert graph_breaks() == {}


def test_the_memory_budget_is_a_share_above_0_and_a_key_field_only_under_compile():
    with pytest.raises(ValidationError, match="compile_memory_budget"):
        TrainConfig(compile=True, compile_memory_budget=0)  # at 0 the gradients came out otherwise
    with pytest.raises(ValidationError, match="compile_memory_budget"):
        TrainConfig(compile=True, compile_memory_budget=1.5)
    assert TrainConfig(compile=True, compile_memory_budget=0.2).canonical()["compile_memory_budget"] == 0.2
    assert "compile_memory_budget" not in TrainConfig(compile=True).canonical()  # the old keys stay valid
    assert "compile_memory_budget" not in TrainConfig(compile_memory_budget=0.2).canonical()  # eager: no effect


@needs_compiler
def test_nf4_layers_compile_whole(tmp_path):
    """bitsandbytes' 4-bit matmul is traced into the layer's graph (its ops are registered with
    torch.library): the host cost this option is for is mostly NF4 layers' Python."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, vocab_size=96)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)

    def build():
        model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map="cpu")
        torch.manual_seed(1)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                                 target_modules=["q_proj", "v_proj"]))
        make_lean(model)
        return model.train()

    counters.clear()
    want = build()
    assert type(want.get_base_model().model.layers[0].self_attn.k_proj) is bnb.nn.Linear4bit
    batch = ids(2, 12)
    model = build()
    compile_decoder_layers(model, CPU)
    got, expected = loss_and_grads(model, batch), loss_and_grads(want, batch)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=0)
    assert_grads_close(got[1], expected[1], rtol=1e-4, atol=1e-7)
    assert graph_breaks() == {}


@needs_compiler
def test_a_gptq_base_trains_compiled(tmp_path_factory, tmp_path, monkeypatch):
    """The 33B preset quantizes with GPTQ: its layers compile whole for training too. gptqmodel's
    kernel dequantizes through float16, which fused kernels round differently: the first step's
    loss (before any update) agrees to 1e-3, not to float32 rounding. (On a GPU the kernel stays;
    on the CPU training dequantizes the base once where memory allows: no room here, so that the
    kernel is what compiles.)"""
    import json

    import expert.modeling as modeling
    from tests.expert.quantize_fixtures import tiny_setup

    monkeypatch.setattr(modeling, "available_memory", lambda: 0)

    gptq = tiny_setup(tmp_path_factory).gptq
    data = write_toy_data(tmp_path / "data")
    run = dict(epochs=1, micro_batch_size=2, effective_batch_size=4, max_steps=2, lora_dropout=0.0,
               precision="float32", dev_loss=False)
    train(TrainConfig(**run), gptq, data, tmp_path / "eager", tmp_path / "work-e", device="cpu")
    counters.clear()
    train(TrainConfig(**run, compile=True), gptq, data, tmp_path / "compiled", tmp_path / "work-c", device="cpu")
    assert counters["stats"]["unique_graphs"] >= 2 and graph_breaks() == {}
    first = [json.loads((tmp_path / side / "train_log.jsonl").read_text().splitlines()[0])["loss"]
             for side in ("eager", "compiled")]
    assert first[1] == pytest.approx(first[0], rel=1e-3), first


@needs_compiler
def test_a_compiled_training_run_ends_where_the_eager_one_does(llama_dir, tmp_path):  # noqa: F811
    """The whole run, wired from the config: two micro-batches a step, dev loss (eval mode) at
    every checkpoint. Without dropout and in float32 the two runs differ by float rounding only
    (under bf16 autocast fused kernels round differently: 6e-4 of the first step's loss)."""
    data = write_toy_data(tmp_path / "data")
    run = dict(epochs=1, micro_batch_size=2, effective_batch_size=4, learning_rate=5e-3, warmup_steps=2,
               save_every_steps=3, lora_dropout=0.0, precision="float32")
    eager = train(TrainConfig(**run), llama_dir, data, tmp_path / "eager", tmp_path / "work-e", device="cpu")
    torch._dynamo.reset()  # count from nothing: code compiled by an earlier test would be reused
    counters.clear()
    compiled = train(TrainConfig(**run, compile=True), llama_dir, data, tmp_path / "compiled", tmp_path / "work-c",
                     device="cpu")
    # Traced: the layers in training (the first layer's input needs no grad, the others' do) and
    # the dev loss's no-grad forward.
    assert counters["stats"]["unique_graphs"] >= 3 and graph_breaks() == {}
    assert compiled["steps"] == eager["steps"] == 6
    for key in ("final_loss", "final_dev_loss"):
        assert compiled[key] == pytest.approx(eager[key], rel=1e-5), key


@needs_compiler
def test_a_compiled_run_with_dropout_resumes_bit_for_bit(llama_dir, tmp_path):  # noqa: F811
    """The compiler draws the dropout masks from the generator the checkpoint saves, so a compiled
    run killed mid-way and resumed ends with the uninterrupted run's adapter, as an eager one does."""
    from safetensors.torch import load_file

    from tests.expert.test_train_loop import Crash, crash_at

    data = write_toy_data(tmp_path / "data")
    config = TrainConfig(epochs=1, micro_batch_size=2, effective_batch_size=4, learning_rate=5e-3, warmup_steps=2,
                         save_every_steps=2, lora_dropout=0.1, compile=True)
    whole = train(config, llama_dir, data, tmp_path / "whole", tmp_path / "work-w", device="cpu")
    with pytest.raises(Crash):
        train(config, llama_dir, data, tmp_path / "out", tmp_path / "work", progress=crash_at(3), device="cpu")
    resumed = train(config, llama_dir, data, tmp_path / "out", tmp_path / "work", device="cpu")
    assert resumed["final_loss"] == whole["final_loss"]
    got, want = (load_file(path / "final" / "adapter_model.safetensors") for path in (tmp_path / "out",
                                                                                      tmp_path / "whole"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_compile_keys_only_runs_that_ask_for_it():
    # Cache keys and checkpoints of runs made before the field existed stay valid; a compiled run
    # (other dropout masks) gets keys of its own.
    assert "compile" not in TrainConfig().canonical()
    assert TrainConfig(compile=True).canonical() == {**TrainConfig().canonical(), "compile": True}


def test_compile_is_refused_where_it_cannot_work(monkeypatch):
    with pytest.raises(ValidationError, match="compile"):
        TrainConfig(compile=True, processes=2, strategy="fsdp", micro_batch_size=2, effective_batch_size=48)
    assert TrainConfig(compile=True, processes=2, strategy="ddp", micro_batch_size="auto").compile

    from torch._inductor import cpp_builder

    def no_compiler():
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    with pytest.raises(ConfigError, match="train.compile .*needs a C\\+\\+ compiler .*no C\\+\\+ compiler found"):
        compile_decoder_layers(lean_model(0.0), CPU)
    monkeypatch.undo()

    class Plain(torch.nn.Module):  # no _no_split_modules: nothing known to compile
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 2)

    with pytest.raises(ConfigError, match="found no decoder layers to compile in Plain"):
        compile_decoder_layers(Plain(), CPU)
