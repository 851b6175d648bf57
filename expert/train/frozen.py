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
