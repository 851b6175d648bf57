"""Frozen linear weights stored in the autocast dtype: the same matmuls, without a cast per call.

Under autocast a linear layer casts its weight to bf16 on every call, and autocast's own cache of
those casts covers only weights that require grad: a frozen base weight in float32 is read and
cast again by every micro-batch's forward (SmolLM2-135M: 106 M weights, a quarter of the time a
bf16 CPU step spends on casts). Storing a frozen weight in bf16 gives the matmul the very tensor autocast
would have made from it, so the loss and gradients are bitwise those of casting on every call,
the step is faster (SmolLM2-135M in bf16 on the CPU: 8% more tokens/s in bench/train_vs_trainer.py,
bench/README.md) and the base takes half the memory. This happens only where autocast runs
(train.precision resolved to bfloat16): float32 training keeps float32 weights.

Only plain `torch.nn.Linear` modules are cast (a quantized linear stores no float weight), and
never an output head that shares its weight with the input embeddings: an embedding lookup is
not autocast, so a bf16 embedding would change the residual stream's dtype.
"""

from __future__ import annotations

import torch

_CASTABLE = (torch.float32, torch.float16)


def cast_frozen_linears(model: torch.nn.Module, dtype: torch.dtype | None) -> int:
    """Store every frozen plain linear weight (and bias) of `model` in `dtype`; how many layers.

    `dtype` is the run's autocast dtype; None (no autocast) changes nothing."""
    if dtype is None:
        return 0
    tied = _tied_head(model)
    count = 0
    for module in model.modules():
        if type(module) is not torch.nn.Linear or module is tied:
            continue
        params = [p for p in (module.weight, module.bias) if p is not None]
        if any(p.requires_grad or p.dtype not in _CASTABLE for p in params):
            continue
        for p in params:
            p.data = p.data.to(dtype)
        count += 1
    return count


def _tied_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The output head when it shares its weight with the input embeddings, else None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not (hasattr(base, "get_output_embeddings") and hasattr(base, "get_input_embeddings")):
        return None
    head, embeddings = base.get_output_embeddings(), base.get_input_embeddings()
    if head is None or embeddings is None:
        return None
    weight = getattr(head, "weight", None)
    return head if weight is not None and weight.data_ptr() == embeddings.weight.data_ptr() else None


# ---------------------------------------------------------------- a GPTQ base on the CPU

def dense_gptq_layers(model: torch.nn.Module, dtype: torch.dtype) -> tuple[int, int]:
    """Replace every GPTQ layer of a CPU model (gptqmodel's torch kernel) by a frozen plain linear
    layer holding its dequantized weights in `dtype`: (layers replaced, bytes they take).

    Training on the CPU runs the 4-bit base through gptqmodel's torch kernel, which dequantizes
    each layer's weights again on every call, forward and backward (its own weight cache is off
    in training mode), then casts them to the input's dtype and multiplies densely. The base is
    frozen, so doing that once gives the matmuls the same weights: the 4-bit model's numbers, 16%
    faster on the default pipeline's 8 steps of SmolLM2 (26.4 s against 30.8, 2 threads, bf16).
    The layers are dequantized in training mode, as the kernel does while training. Layers that do
    more than dequantize and multiply (an online Hadamard rotation of the input, an EoRA adapter),
    or whose dequantized weights are not [in, out], are left as they are; so is a model on a GPU,
    where the 4-bit weights are the point.

    `dtype`: the run's autocast dtype (autocast would cast the weights to it), else the dtype of
    the model's activations (the kernel casts its weights to the input's dtype). The caller
    checks that the dense weights fit (`dense_gptq_bytes`).
    """
    replaced, size = 0, 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            weights = dense_gptq_weight(child)
            if weights is None:
                continue
            dense = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                    device="meta")
            # gptqmodel multiplies x @ weights ([in, out]); a linear layer keeps [out, in]
            dense.weight = torch.nn.Parameter(weights.t().to(dtype).contiguous(), requires_grad=False)
            if child.bias is not None:
                dense.bias = torch.nn.Parameter(child.bias.detach().to(dtype), requires_grad=False)
            setattr(parent, name, dense)
            replaced += 1
            size += dense.weight.nbytes
    return replaced, size


def dense_gptq_weight(module: torch.nn.Module) -> torch.Tensor | None:
    """The weights a plain GPTQ layer (`plain_gptq_kernel`) multiplies by, [in, out], dequantized
    in training mode as the kernel does while training; None for any other layer, or one whose
    dequantized weights are padded past [in, out]."""
    if not plain_gptq_kernel(module):
        return None
    module.train()  # the kernel's training layout (it switches its zero points on train())
    with torch.no_grad():
        weights = module.dequantize_weight(num_itr=module.g_idx.shape[0] // module.in_features)
    return weights if tuple(weights.shape) == (module.in_features, module.out_features) else None


def dense_gptq_bytes(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """What `dense_gptq_layers` would take, before doing it."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return sum(m.in_features * m.out_features * itemsize for m in model.modules() if plain_gptq_kernel(m))


def plain_gptq_kernel(module: torch.nn.Module) -> bool:
    """gptqmodel's torch kernel (TorchLinear, the CPU's training kernel) with nothing around its matmul."""
    if type(module).__name__ != "TorchLinear" or not hasattr(module, "dequantize_weight"):
        return False
    if getattr(module, "online_full_had", False) or getattr(module, "online_partial_had", False):
        return False
    return not getattr(module, "adapter", None)
