"""Lean activations: the same forward and gradients, with fewer tensors kept for the backward.

Without gradient checkpointing, what the backward needs from the forward is what limits the
micro-batch, and recomputing each layer (checkpointing) costs a third of the step's compute. On
a Llama block with LoRA on every linear layer, the standard stack (transformers + PEFT) keeps
374 KiB per token per layer on an 8B shape under bf16 autocast, and this module 136
(bench/lean_memory.py); the difference is three things the backward does not need:

- LoRA dropout: PEFT runs `lora_B(lora_A(dropout(x)))` per adapted layer, so each layer keeps its
  own dropped copy of the input (and its mask), while q, k and v share the same input. Here one
  autograd function adds the LoRA term, keeps the shared input once and a seed, and on a GPU
  draws the same dropout mask again in the backward (the CPU keeps it, see REDRAW_MASK_ON).
- RMSNorm: transformers upcasts to float32 and autograd keeps the float32 copies; here the input
  and one reciprocal root per token are kept.
- SiLU(gate) * up: autograd keeps gate, SiLU(gate) and up; here gate and up.

Forward values are bitwise those of the modules replaced (the same operations in the same
order); gradients agree to rounding. Only the modules whose computation is verified to be the one
reproduced are switched (a norm by comparing outputs on a probe input, an MLP by its forward's
code, a LoRA layer per call: merged, DoRA and multi-adapter calls, and calls that torch.compile
traces (train.compile), keep PEFT's forward), so a model family this does not know trains as before.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F

_MLP_LINE = "self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))"


def make_lean(model: torch.nn.Module) -> dict[str, int]:
    """Switch `model`'s LoRA layers, RMSNorms and SiLU MLPs to their lean forwards; counts."""
    counts = {"lora": 0, "rmsnorm": 0, "mlp": 0}
    for module in model.modules():
        if "forward" in vars(module):
            continue  # already switched (or patched by someone else): leave it
        if _is_lora_linear(module):
            _switch(module, _lora_forward)
            counts["lora"] += 1
        elif _is_rmsnorm(module):
            _switch(module, _rmsnorm_forward)
            counts["rmsnorm"] += 1
        elif _is_silu_mlp(module):
            _switch(module, _mlp_forward)
            counts["mlp"] += 1
    return counts


@contextlib.contextmanager
def counting_kept_bytes(model: torch.nn.Module) -> Iterator[dict[int, int]]:
    """Count what autograd keeps for the backward inside the block: storage -> bytes of the
    distinct activation storages (weights and buffers excluded). Sum the values after the block."""
    weights = {p.data_ptr() for p in model.parameters()} | {b.data_ptr() for b in model.buffers()}
    kept: dict[int, int] = {}

    def pack(t):
        if t.data_ptr() not in weights:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield kept


def _switch(module: torch.nn.Module, forward) -> None:
    module._expert_plain_forward = module.forward
    module.forward = types.MethodType(forward, module)


# ---------------------------------------------------------------- LoRA

def _is_lora_linear(module) -> bool:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return False
    return isinstance(module, LoraLayer) and hasattr(module, "base_layer") and hasattr(module, "lora_A")


def _plain_adapter(module, kwargs) -> str | None:
    """The one active adapter when the call is plain LoRA (no merge, variant, mixed batch), else None."""
    if module.disable_adapters or module.merged or kwargs.get("adapter_names") is not None \
            or kwargs.get("alora_offsets") is not None:
        return None
    active = [name for name in module.active_adapters if name in module.lora_A]
    if len(active) != 1 or active[0] in getattr(module, "lora_variant", {}):
        return None
    name = active[0]
    # DoRA as PEFT releases before lora_variant mark it (use_dora, a magnitude vector).
    if getattr(module, "use_dora", {}).get(name) or name in getattr(module, "lora_magnitude_vector", {}):
        return None
    a, b, dropout = module.lora_A[name], module.lora_B[name], module.lora_dropout[name]
    if type(a) is not torch.nn.Linear or type(b) is not torch.nn.Linear or a.bias is not None or b.bias is not None:
        return None
    if not isinstance(dropout, (torch.nn.Dropout, torch.nn.Identity)):
        return None
    return name


def _lora_forward(self, x, *args, **kwargs):
    name = _plain_adapter(self, kwargs)
    # While torch.compile traces (train.compile), PEFT's forward: the seed below is a host value and
    # the mask's generator an object the compiler cannot trace, and the compiler picks what to keep.
    if name is None or torch.compiler.is_compiling():
        return self._expert_plain_forward(x, *args, **kwargs)
    for key in ("adapter_names", "alora_offsets"):
        kwargs.pop(key, None)
    result = self.base_layer(x, *args, **kwargs)
    dropout = self.lora_dropout[name]
    p = float(dropout.p) if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
    # The mask's seed comes from the CPU generator: seeded runs repeat, and checkpointing's
    # recompute (which restores the RNG state) draws the same masks.
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64)) if p > 0 else 0
    return _LoraDelta.apply(result, x, self.lora_A[name].weight, self.lora_B[name].weight,
                            float(self.scaling[name]), p, seed)


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """What PEFT's matmuls compute in: the autocast dtype under autocast, else the LoRA weights'."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind) and weight.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.get_autocast_dtype(kind)
    return weight.dtype


# Where the backward draws the dropout mask again from its seed instead of keeping it. On a GPU
# drawing is a memory-bound kernel, far cheaper than the memory a kept mask takes from the
# micro-batch. On the CPU drawing costs compute and memory is rarely the limit (redrawing
# bernoulli_ masks made a SmolLM2 step 6% slower on 2 threads; `_mask` now draws 4x cheaper), so
# the CPU keeps the mask (bool, 1 byte per value: still a third of PEFT's dropped copy and mask).
REDRAW_MASK_ON = frozenset({"cuda"})


def _mask(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The dropout mask of `x`'s shape (True: dropped), a function of the seed alone.

    Four 16-bit draws come from each 64-bit random number: on the CPU that is a quarter of the
    generator's work of `bernoulli_` (0.6 instead of 2.6 ms for a SmolLM2 micro-batch's input, 9% of
    a bf16 training step before). The drop rate is p rounded to a multiple of 1/65536.
    """
    generator = torch.Generator(device=x.device)
    generator.manual_seed(seed)
    n = x.numel()
    words = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device,
                          generator=generator)
    return (words.view(torch.int16)[:n] < -32768 + round(p * 65536)).reshape(x.shape)


def _dropped(x: torch.Tensor, dtype: torch.dtype, p: float, seed: int,
             dropped: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dropout(x) in `dtype`, the mask (True: dropped): `dropped`, else drawn from the seed).

    The 1/(1-p) scale is applied as a Python number, so a bf16 result is rounded once, as torch's
    dropout does (a bf16 mask holding 1/0.95 would round it to 1.0547 and bias every kept value).
    The dropped values are filled with zeros rather than multiplied by a bool mask: a bf16 x bool
    product takes PyTorch's mixed-dtype elementwise path, which on the 8B preset's H100 profile
    was 12% of the GPU's busy time (896 calls a step); `masked_fill` reads the bool as a bool.
    """
    xd = x.to(dtype)
    if p == 0.0:
        return xd, None
    dropped = _mask(x, p, seed) if dropped is None else dropped
    return xd.masked_fill(dropped, 0).mul_(1.0 / (1.0 - p)), dropped


def _exact_scale(scaling: float) -> bool:
    """Whether multiplying by `scaling` is exact in floating point (a positive power of two: the
    presets' alpha / r = 2). Then (h @ B) * s and h @ (B * s) are bitwise the same, and scaling B
    (r x out values) saves a pass over the layer's whole output, forward and backward (on the 8B
    preset's H100 profile, scalar multiplies were 8% of the GPU's busy time, about half of them
    this scale)."""
    return scaling > 0 and math.frexp(scaling)[0] == 0.5


class _LoraDelta(torch.autograd.Function):
    """result + scaling * B(A(dropout(x))), keeping x (shared by the layers reading the same
    input), A's r-wide output and a seed (plus the mask where it is not redrawn, see
    REDRAW_MASK_ON); the dropped input is rebuilt in the backward."""

    @staticmethod
    def forward(ctx, result, x, weight_a, weight_b, scaling: float, p: float, seed: int):
        dtype = _compute_dtype(x, weight_a)
        with torch.autocast(x.device.type, enabled=False):
            xd, dropped = _dropped(x, dtype, p, seed)
            h = F.linear(xd, weight_a.to(dtype))
            if _exact_scale(scaling):  # B's few values scaled instead of the layer's whole output
                delta = F.linear(h, weight_b.to(dtype) * scaling)
            else:
                delta = F.linear(h, weight_b.to(dtype)) * scaling
            out = result + delta.to(result.dtype)
        saved_mask = dropped if dropped is not None and x.device.type not in REDRAW_MASK_ON else None
        ctx.save_for_backward(x, weight_a, weight_b, h, saved_mask)
        ctx.dtype, ctx.scaling, ctx.p, ctx.seed = dtype, scaling, p, seed
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight_a, weight_b, h, saved_mask = ctx.saved_tensors
        dtype = ctx.dtype
        with torch.autocast(x.device.type, enabled=False):
            if _exact_scale(ctx.scaling):  # the scale on B-sized tensors, not on the output's gradient
                g = grad.to(dtype)
                g2, h2 = g.reshape(-1, g.shape[-1]), h.reshape(-1, h.shape[-1])
                grad_b = (g2.t() @ h2) * ctx.scaling if ctx.needs_input_grad[3] else None
                gh = g @ (weight_b.to(dtype) * ctx.scaling)
            else:
                g = grad.to(dtype) * ctx.scaling
                g2, h2 = g.reshape(-1, g.shape[-1]), h.reshape(-1, h.shape[-1])
                grad_b = g2.t() @ h2 if ctx.needs_input_grad[3] else None
                gh = g @ weight_b.to(dtype)
            grad_a = grad_x = None
            if ctx.needs_input_grad[2] or ctx.needs_input_grad[1]:
                xd, dropped = _dropped(x, dtype, ctx.p, ctx.seed, saved_mask)
                if ctx.needs_input_grad[2]:
                    grad_a = gh.reshape(-1, gh.shape[-1]).t() @ xd.reshape(-1, xd.shape[-1])
                if ctx.needs_input_grad[1]:
                    grad_x = gh @ weight_a.to(dtype)
                    if dropped is not None:
                        grad_x = grad_x.masked_fill_(dropped, 0).mul_(1.0 / (1.0 - ctx.p))
                    grad_x = grad_x.to(x.dtype)
        return grad, grad_x, grad_a, grad_b, None, None, None


# ---------------------------------------------------------------- RMSNorm

def _is_rmsnorm(module) -> bool:
    """A Llama-style RMSNorm: weight * normalize(x in float32).to(x's dtype), checked on a probe."""
    weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    if not type(module).__name__.endswith("RMSNorm") or not isinstance(weight, torch.Tensor) \
            or weight.dim() != 1 or not isinstance(eps, float) or weight.device.type == "meta":
        return False
    generator = torch.Generator(device=weight.device).manual_seed(0)
    probe = torch.randn((3, weight.shape[0]), generator=generator, device=weight.device).to(weight.dtype)
    with torch.no_grad():
        return torch.equal(module(probe), _RMSNorm.apply(probe, weight, eps))


def _rmsnorm_forward(self, hidden_states):
    return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        xf = x.to(torch.float32)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.to(torch.float32) * rstd
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad * xhat.to(x.dtype)).reshape(-1, weight.shape[0]).sum(0).to(weight.dtype)
        gx = (grad * weight).to(torch.float32)
        grad_x = rstd * (gx - xhat * (gx * xhat).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_w, None


# ---------------------------------------------------------------- MLP

def _is_silu_mlp(module) -> bool:
    """An MLP whose forward is exactly down(SiLU(gate(x)) * up(x))."""
    act = getattr(module, "act_fn", None)
    if not all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj")):
        return False
    if not (isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"):
        return False
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False
    body = [line.strip() for line in source.splitlines()[1:] if line.strip() and not line.strip().startswith("#")]
    return body in ([f"down_proj = {_MLP_LINE}", "return down_proj"], [f"return {_MLP_LINE}"])


def _mlp_forward(self, x):
    return self.down_proj(_SiluMul.apply(self.gate_proj(x), self.up_proj(x)))


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        # The kernels autograd runs for F.silu(gate) * up, so the gradients are bitwise its own;
        # only SiLU(gate) is recomputed instead of kept.
        gate, up = ctx.saved_tensors
        return torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)
