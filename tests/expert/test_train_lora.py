"""LoRA wrapping, the answer-token loss, schedules, optimizer state and adapter round trips."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from expert.errors import ConfigError
from expert.train import TrainConfig
from expert.train.checkpoint import _join_optimizer, _split_optimizer
from expert.train.data import IGNORE, collate, encode_split, read_split
from expert.train.step import answer_loss_sum
from expert.train.lora import attach_lora, lr_factor, make_optimizer, resolve_targets
from tests.expert.train_fixtures import plain_load, write_toy_data, llama_dir, one_thread  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def batch(llama_dir, tmp_path_factory):
    _, tok = plain_load(llama_dir)
    rows = read_split(write_toy_data(tmp_path_factory.mktemp("data")) / "train.parquet")
    examples = encode_split(tok, rows, 512).examples[:4]
    assert len({len(e.input_ids) for e in examples}) > 1  # padding must be there to be ignored
    return {**collate(examples, tok.pad_token_id), "lengths": [len(e.input_ids) for e in examples]}


def lora_model(llama_dir, **overrides):
    model, _ = plain_load(llama_dir)
    torch.manual_seed(0)
    return attach_lora(model, TrainConfig(**overrides))


def test_only_lora_weights_get_gradients(llama_dir, batch):
    model = lora_model(llama_dir, lora_dropout=0.0)
    model.train()
    answer_loss_sum(model, batch, torch.device("cpu")).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj"}
    # lora_B starts at zero, so only its gradient is non-zero before the first update.
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in trainable if ".lora_B." in n)


def test_lora_step_changes_only_lora_weights(llama_dir, batch):
    model = lora_model(llama_dir, lora_dropout=0.0)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = make_optimizer(TrainConfig(learning_rate=1e-2), model)
    for _ in range(2):  # lora_A moves from the second step on, once lora_B is non-zero
        answer_loss_sum(model, batch, torch.device("cpu")).backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad}


def test_answer_loss_matches_the_models_own_loss(llama_dir, batch):
    # logits_to_keep and the shift must pick exactly the labelled positions.
    model, _ = plain_load(llama_dir)
    labels = batch["labels"]
    ours = answer_loss_sum(model, batch, torch.device("cpu"))
    mask = torch.zeros_like(labels)
    for row, n in enumerate(batch["lengths"]):
        mask[row, :n] = 1
    theirs = model(input_ids=batch["input_ids"], attention_mask=mask, labels=labels).loss
    n_targets = int((labels[:, 1:] != IGNORE).sum())
    assert float(ours) == pytest.approx(float(theirs) * n_targets, rel=1e-5)


def test_answer_loss_projects_only_the_labelled_tokens(llama_dir, batch):
    # The vocabulary projection must see one row per labelled token, however far a short
    # example's answer sits from the batch's end (the 8B preset built ~15 GiB of logits when
    # it was asked for every position from the batch's first answer on).
    model, _ = plain_load(llama_dir)
    labels = batch["labels"]
    first = (labels != IGNORE).int().argmax(dim=1)
    assert int(first.max() - first.min()) > 3  # answers at different depths: the case that mattered
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    try:
        answer_loss_sum(model, batch, torch.device("cpu"))
    finally:
        handle.remove()
    assert seen == [torch.Size([1, int((labels[:, 1:] != IGNORE).sum()), model.config.hidden_size])]


def test_answer_loss_without_a_head_module_picks_from_the_full_logits(llama_dir, batch, monkeypatch):
    # A model that computes its logits without calling get_output_embeddings() (so the gather
    # never runs) must still get the same loss, from the full logits.
    model, _ = plain_load(llama_dir)
    expected = answer_loss_sum(model, batch, torch.device("cpu"))
    monkeypatch.setattr(type(model), "get_output_embeddings", lambda self: torch.nn.Identity())
    assert float(answer_loss_sum(model, batch, torch.device("cpu"))) == pytest.approx(float(expected), rel=1e-6)


def test_answer_loss_picks_right_aligned_logits_when_the_model_adds_positions(llama_dir, batch, monkeypatch):
    # A model that puts positions of its own before the input (and so never shows the head the
    # batch's [batch, width] positions) gets its logits picked aligned on the right.
    model, _ = plain_load(llama_dir)
    expected = answer_loss_sum(model, batch, torch.device("cpu"))
    real_forward = model.forward

    def with_two_extra_positions(**kwargs):
        out = real_forward(**kwargs)
        out.logits = torch.cat([torch.zeros_like(out.logits[:, :2]), out.logits], dim=1)
        return out

    monkeypatch.setattr(model, "forward", with_two_extra_positions)
    monkeypatch.setattr(type(model), "get_output_embeddings", lambda self: torch.nn.Identity())
    assert float(answer_loss_sum(model, batch, torch.device("cpu"))) == pytest.approx(float(expected), rel=1e-6)

    def too_short(**kwargs):
        out = real_forward(**kwargs)
        out.logits = out.logits[:, 1:]
        return out

    monkeypatch.setattr(model, "forward", too_short)
    with pytest.raises(ValueError, match="one row of logits per position"):
        answer_loss_sum(model, batch, torch.device("cpu"))


def test_uneven_micro_batches_give_the_gradient_of_one_batch(llama_dir, tmp_path):
    # The loss of a step is divided by the whole step's answer tokens, so 9 examples as 5 + 4 (what
    # 'auto' does when 5 fits and the step is 9) or 3 + 3 + 3 give one batch's gradient.
    from expert.train.step import Runner

    _, tok = plain_load(llama_dir)
    rows = read_split(write_toy_data(tmp_path) / "train.parquet")
    split = encode_split(tok, rows, 512)

    class Recording(torch.optim.SGD):
        def step(self, closure=None):
            self.grads = [p.grad.clone() for group in self.param_groups for p in group["params"]]

    def gradients(batches):
        model = lora_model(llama_dir, lora_dropout=0.0)
        model.train()
        with torch.no_grad():  # lora_B starts at 0, so lora_A would get no gradient
            for name, p in model.named_parameters():
                if ".lora_B." in name:
                    p.normal_(std=0.02)
        optimizer = Recording([p for p in model.parameters() if p.requires_grad], lr=0.0)
        runner = Runner(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), split,
                        tok.pad_token_id, max_grad_norm=None, precision="float32")
        loss = runner.step(batches)[0]
        return loss, optimizer.grads

    one_loss, one = gradients([list(range(9))])
    for batches in ([[0, 1, 2, 3, 4], [5, 6, 7, 8]], [[6, 2, 0], [1, 8, 4], [3, 5, 7]]):
        loss, grads = gradients(batches)
        assert loss == pytest.approx(one_loss, rel=1e-6)
        assert all(torch.allclose(g, h, rtol=1e-4, atol=1e-7) for g, h in zip(grads, one))
    assert any(g.abs().sum() > 0 for g in one)


def test_missing_target_module_lists_the_existing_ones(llama_dir):
    model, _ = plain_load(llama_dir)
    with pytest.raises(ConfigError) as info:
        resolve_targets(model, TrainConfig(target_modules=["q_proj", "query_key_value"]))
    message = str(info.value)
    assert "query_key_value not found" in message and "q_proj," not in message.split("it has:")[0]
    for name in ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"):
        assert name in message.split("it has:")[1]


def test_all_linear_targets_every_projection_but_not_the_head(llama_dir):
    model, _ = plain_load(llama_dir)
    targets = resolve_targets(model, TrainConfig(target_modules="all-linear"))
    assert targets == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    wrapped = attach_lora(model, TrainConfig(target_modules="all-linear"))
    assert not any("lm_head" in n for n, p in wrapped.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("kind, step, expected", [
    ("linear", 0, 1 / 4), ("linear", 3, 1.0), ("linear", 4, 1.0), ("linear", 9, 1 - 5 / 6),
    ("cosine", 4, 1.0), ("cosine", 7, 0.5), ("constant", 1, 0.5), ("constant", 9, 1.0),
])
def test_lr_schedule(kind, step, expected):
    # warmup 4 of 10 steps: 1/4, 2/4, 3/4, 1, then decay over the remaining 6.
    assert lr_factor(step, warmup=4, total=10, kind=kind) == pytest.approx(expected)
    assert lr_factor(9, 4, 10, kind) > 0  # the last update still moves


@pytest.mark.parametrize("name", ["adamw", "adamw_8bit"])
def test_optimizer_state_round_trips_without_pickle(name):
    if name != "adamw":
        pytest.importorskip("bitsandbytes")
    layer = torch.nn.Linear(128, 64)  # 8192 weights: bnb keeps 8-bit state from 4096 values on
    optimizer = make_optimizer(TrainConfig(optimizer=name), layer)
    layer(torch.randn(3, 128)).square().sum().backward()
    optimizer.step()
    tensors, meta = _split_optimizer(optimizer.state_dict())
    restored = _join_optimizer(tensors, meta)
    original = optimizer.state_dict()
    assert restored["param_groups"] == original["param_groups"]
    assert restored["state"].keys() == original["state"].keys() == {0, 1}
    assert_same(restored["state"], original["state"])
    if name == "adamw_8bit":  # bitsandbytes nests its 8-bit buffers in a dict per parameter
        assert any(t.dtype == torch.uint8 for t in tensors.values())


def assert_same(got, want):
    if isinstance(want, dict):
        assert got.keys() == want.keys()
        for key in want:
            assert_same(got[key], want[key])
    elif isinstance(want, torch.Tensor):
        assert torch.equal(got, want)
    else:
        assert got == want


def test_saved_adapter_reloads_with_plain_peft_and_gives_identical_logits(llama_dir, batch, tmp_path):
    from peft import PeftModel

    model = lora_model(llama_dir)
    with torch.no_grad():  # move lora_B off zero so the adapter changes the output
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(std=0.5)
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    base_logits = base(input_ids=batch["input_ids"]).logits
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        ours = model(input_ids=batch["input_ids"]).logits
        theirs = reloaded(input_ids=batch["input_ids"]).logits
    assert torch.equal(ours, theirs)
    assert not torch.allclose(ours, base_logits, atol=1e-3)
    assert math.isfinite(float(ours.sum()))
