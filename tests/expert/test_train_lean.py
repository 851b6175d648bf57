"""Lean activations (expert/train/lean.py): same numbers as transformers + PEFT, less kept memory."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from expert.train import lean as lean_module
from expert.train.lean import _dropped, _exact_scale, _LoraDelta, counting_kept_bytes, make_lean

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_lora(dropout: float, dtype=torch.float32, layers: int = 2, hidden: int = 64, inter: int = 160,
              alpha: int = 8, **lora) -> torch.nn.Module:
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=layers, vocab_size=96, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=alpha, lora_dropout=dropout, target_modules=ALL_LINEAR,
                                             **lora))
    with torch.no_grad():  # lora_B starts at zero; a non-zero B gives A and the input real gradients
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.train()
    return model


def loss_and_grads(model, ids, autocast: bool = False, seed: int = 1):
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def ids(batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, 96, (batch, length), generator=torch.Generator().manual_seed(3))


def assert_grads_close(got: dict, want: dict, rtol: float, atol: float = 0.0, of_max: float = 0.0) -> None:
    """Elementwise closeness, or (of_max) every difference within that share of the largest entry:
    bf16 matmuls summed in another order differ by a few bf16 steps of the largest terms."""
    assert got.keys() == want.keys()
    for name in want:
        atol_here = max(atol, of_max * float(want[name].abs().max()))
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol_here, msg=name)


def test_every_llama_block_part_is_switched():
    model = tiny_lora(0.05)
    assert make_lean(model) == {"lora": 2 * 7, "rmsnorm": 2 * 2 + 1, "mlp": 2}
    assert make_lean(model) == {"lora": 0, "rmsnorm": 0, "mlp": 0}  # a second call changes nothing


# alpha / r = 2 scales B instead of the output (exact for a power of two); 1.5 scales the output
@pytest.mark.parametrize("alpha", [8, 6], ids=["scale-2", "scale-1.5"])
@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_same_loss_and_gradients_as_peft_without_dropout(autocast, alpha):
    plain = tiny_lora(0.0, alpha=alpha)
    lean = copy.deepcopy(plain)
    make_lean(lean)
    batch = ids()
    want_loss, want = loss_and_grads(plain, batch, autocast)
    got_loss, got = loss_and_grads(lean, batch, autocast)
    assert torch.equal(got_loss, want_loss)  # the forward is the same operations in the same order
    tol = {"rtol": 0, "of_max": 2e-2} if autocast else {"rtol": 1e-4, "atol": 1e-6}
    assert_grads_close(got, want, **tol)


@pytest.fixture(params=["redrawn", "kept"])
def mask_mode(request, monkeypatch):
    """Both ways the backward gets the dropout mask: drawn again from its seed (as on a GPU) or
    kept from the forward (as on the CPU)."""
    monkeypatch.setattr(lean_module, "REDRAW_MASK_ON", frozenset({"cpu"} if request.param == "redrawn" else ()))
    return request.param


def test_dropout_masks_are_the_forwards_in_the_backward(mask_mode):
    """Redrawn from the seed or kept, the backward's mask is the forward's: the gradients are
    those of the explicit formula with that very mask, for every input."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, requires_grad=True)
    a = torch.randn(4, 16, requires_grad=True)
    b = torch.randn(8, 4, requires_grad=True)
    result = torch.randn(3, 5, 8, requires_grad=True)
    out = _LoraDelta.apply(result, x, a, b, 2.0, 0.3, 1234)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    got = [t.grad.clone() for t in (result, x, a, b)]
    for t in (result, x, a, b):
        t.grad = None

    _, dropped = _dropped(x.detach(), torch.float32, 0.3, 1234)
    assert dropped.dtype == torch.bool and 0.2 < dropped.float().mean() < 0.4  # 240 draws of p=0.3
    want_out = result + ((x * ~dropped / 0.7) @ a.t() @ b.t()) * 2.0
    torch.testing.assert_close(out, want_out)
    want_out.backward(upstream)
    for g, t in zip(got, (result, x, a, b)):
        torch.testing.assert_close(g, t.grad)


def test_dropout_is_seeded_and_replayed_by_checkpointing(mask_mode):
    """Masks come from the seeded CPU generator: a rerun repeats them, and gradient
    checkpointing's recompute draws the same ones (else its gradients would be wrong)."""
    model = tiny_lora(0.3)
    make_lean(model)
    batch = ids()
    loss1, grads1 = loss_and_grads(model, batch, seed=5)
    loss2, grads2 = loss_and_grads(model, batch, seed=5)
    loss3, _ = loss_and_grads(model, batch, seed=6)
    assert torch.equal(loss1, loss2) and not torch.equal(loss1, loss3)
    assert_grads_close(grads2, grads1, rtol=0, atol=0)
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss4, grads4 = loss_and_grads(model, batch, seed=5)
    assert torch.equal(loss4, loss1)
    assert_grads_close(grads4, grads1, rtol=1e-5, atol=1e-7)


def test_eval_mode_drops_nothing_and_equals_peft():
    plain = tiny_lora(0.5)
    lean = copy.deepcopy(plain)
    make_lean(lean)
    plain.eval()
    lean.eval()
    with torch.no_grad():
        assert torch.equal(lean(input_ids=ids()).logits, plain(input_ids=ids()).logits)


def saved_bytes(model, batch, autocast: bool = True) -> int:
    """Bytes of the distinct activation storages autograd keeps for the backward."""
    with counting_kept_bytes(model) as kept:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    return sum(kept.values())


def test_a_block_keeps_much_less_for_the_backward(monkeypatch):
    """Per decoder layer (the difference between 3 and 2 layers), as on the GPU: a bf16 base,
    float32 LoRA weights, autocast, masks redrawn. On the 8B shape the ratio is 374 / 136 KiB per
    token; with the masks kept (the CPU's way) still well under PEFT's."""
    batch = ids(2, 64)

    def per_layer(lean: bool) -> int:
        sizes = []
        for layers in (2, 3):
            model = tiny_lora(0.05, torch.bfloat16, layers=layers, hidden=128, inter=448)
            if lean:
                make_lean(model)
            sizes.append(saved_bytes(model, batch))
        return sizes[1] - sizes[0]

    peft = per_layer(False)
    kept = per_layer(True)
    monkeypatch.setattr(lean_module, "REDRAW_MASK_ON", frozenset({"cpu", "cuda"}))
    redrawn = per_layer(True)
    assert redrawn < kept < 0.6 * peft and redrawn < 0.5 * peft, (peft, kept, redrawn)


def test_what_it_does_not_know_keeps_its_own_forward():
    # DoRA is a PEFT variant: its layers keep PEFT's forward (the call falls through), same numbers
    # (the norms and MLPs around them are still switched: gradients to rounding).
    plain = tiny_lora(0.0, use_dora=True)
    lean = copy.deepcopy(plain)
    make_lean(lean)
    batch = ids()
    want_loss, want = loss_and_grads(plain, batch)
    got_loss, got = loss_and_grads(lean, batch)
    assert torch.equal(got_loss, want_loss)
    assert_grads_close(got, want, rtol=1e-4, atol=1e-6)
    assert any("lora_magnitude_vector" in name for name in got)  # DoRA's own weights got gradients

    class GemmaLikeRMSNorm(torch.nn.Module):  # (1 + weight): not the computation reproduced
        def __init__(self):
            super().__init__()
            self.weight, self.variance_epsilon = torch.nn.Parameter(torch.zeros(8)), 1e-6

        def forward(self, x):
            return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)

    class GeluMLP(torch.nn.Module):  # right names, another forward
        def __init__(self):
            super().__init__()
            self.gate_proj = self.up_proj = self.down_proj = torch.nn.Linear(8, 8)
            self.act_fn = torch.nn.SiLU()

        def forward(self, x):
            return self.down_proj(torch.nn.functional.gelu(self.gate_proj(x)) * self.up_proj(x))

    assert make_lean(torch.nn.ModuleList([GemmaLikeRMSNorm(), GeluMLP()])) == {"lora": 0, "rmsnorm": 0, "mlp": 0}


def test_bf16_dropout_scales_kept_values_like_torch():
    """Kept values are x / (1 - p) rounded once, as torch's dropout gives them (a bf16 mask holding
    1 / 0.95 would be 1.0547 and inflate every kept value by 0.2%)."""
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    xd, dropped = _dropped(x, torch.bfloat16, 0.05, 7)
    kept = ~dropped
    assert 0.93 < kept.float().mean() < 0.97  # 4096 draws of p=0.05
    assert torch.equal(xd[kept], (x.float() * (1 / 0.95)).to(torch.bfloat16)[kept])
    assert torch.all(xd[~kept] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_gradients_are_autograds_own(dtype):
    from expert.train.lean import _SiluMul

    gen = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(8, 96, generator=gen).to(dtype).requires_grad_() for _ in range(2))
    upstream = torch.randn(8, 96, generator=gen).to(dtype)
    (torch.nn.functional.silu(gate) * up).backward(upstream)
    want = gate.grad.clone(), up.grad.clone()
    gate.grad = up.grad = None
    out = _SiluMul.apply(gate, up)
    out.backward(upstream)
    assert torch.equal(out, torch.nn.functional.silu(gate) * up)
    assert torch.equal(gate.grad, want[0]) and torch.equal(up.grad, want[1])


def test_attach_lora_switches_only_with_lean_activations_on():
    from expert.train import TrainConfig
    from expert.train.lora import attach_lora

    def switched(lean: bool) -> int:
        config = LlamaConfig(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
                             num_hidden_layers=2, vocab_size=96)
        model = attach_lora(LlamaForCausalLM(config), TrainConfig(lean_activations=lean, target_modules="all-linear"))
        return sum("forward" in vars(m) for m in model.modules())

    assert switched(True) == 2 * 7 + 2 * 2 + 1 + 2 and switched(False) == 0


def test_the_mask_drops_at_rate_p_and_depends_on_the_seed_only():
    from expert.train.lean import _mask

    x = torch.empty(200_003)
    for p in (0.05, 0.1, 0.5):
        rate = _mask(x, p, 11).float().mean().item()
        assert abs(rate - p) < 4 * (p * (1 - p) / x.numel()) ** 0.5, (p, rate)  # within 4 sigma
    assert torch.equal(_mask(x, 0.1, 11), _mask(x, 0.1, 11)) and not torch.equal(_mask(x, 0.1, 11), _mask(x, 0.1, 12))
    assert _mask(torch.empty(3, 5, 7), 0.1, 1).shape == (3, 5, 7)


def test_only_powers_of_two_scale_b_instead_of_the_output():
    assert [_exact_scale(s) for s in (2.0, 1.0, 0.5, 4.0, 0.25)] == [True] * 5
    assert [_exact_scale(s) for s in (1.5, 3.0, 16 / 12 ** 0.5, 0.0, -2.0)] == [False] * 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaling_b_gives_bitwise_the_scaled_output_and_gradients(dtype, monkeypatch):
    # What the fold relies on: for a power of two, h @ (B * s) is (h @ B) * s to the bit, and so
    # are the gradients it gives, in float32 and in bf16.
    torch.manual_seed(0)
    x = torch.randn(3, 7, 32, dtype=dtype, requires_grad=True)
    a = torch.randn(4, 32, dtype=dtype, requires_grad=True)
    b = torch.randn(48, 4, dtype=dtype, requires_grad=True)
    result = torch.randn(3, 7, 48, dtype=dtype)
    upstream = torch.randn(3, 7, 48, dtype=dtype)

    def run(scaling):
        out = _LoraDelta.apply(result, x, a, b, scaling, 0.0, 0)
        out.backward(upstream)
        grads = [t.grad.clone() for t in (x, a, b)]
        for t in (x, a, b):
            t.grad = None
        return out.detach(), grads

    folded, folded_grads = run(2.0)
    monkeypatch.setattr(lean_module, "_exact_scale", lambda s: False)
    plain, plain_grads = run(2.0)
    assert torch.equal(folded, plain)
    assert all(torch.equal(f, p) for f, p in zip(folded_grads, plain_grads))
