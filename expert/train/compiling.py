"""train.compile: torch.compile each decoder layer of the model being trained.

On the original job's shape (33B, NF4, micro-batches of 5) an H100 spent about a fifth of its
kernel time on elementwise kernels and reductions, and waited on the host about 15% of each step
(bench/results/gpu_h100_2026-11-27a.json, read in bench/README): each of 60 layers launches dozens
of small kernels (norms, rotary, SiLU, dropout, LoRA, NF4 dequantization), with Python,
bitsandbytes' calls and autograd between them. Compiling a layer fuses its elementwise work into
a few kernels and replaces that Python with generated code.

The layers are compiled one by one ("regional compilation"), not the whole model: they share
their code, so the compiler traces one layer and every other layer reuses the result, and the
output head, loss and data handling stay as they are. Shapes are dynamic from the start: the
length-bucketed batches change width every micro-batch, and one graph serves every width. A
layer's first call compiles it (tens of seconds); so does the first call with the gradient
checkpointing setting, training/eval mode or grad mode changed (the memory probe, the dev loss).

What changes against eager: fused kernels round in another order (float32 losses agree to
~1e-6), and LoRA dropout draws its masks with the compiler's generator, so a compiled run and
an eager run with the same seed drop different values (each run still repeats itself, and
checkpointing's recompute draws the same masks). `expert.train.lean` gives the LoRA layers
PEFT's own forward while compiling; what to keep for the backward is the compiler's choice.
"""

from __future__ import annotations

import torch

from expert.errors import ConfigError

# Variants of the one compiled layer code: the first layer (input without grad) and the others,
# checkpointing on and off (the memory probe tries both), training and eval (dev loss), and the
# micro-batch of 1 (a dimension of size 1 is specialized). The default limit of 8 would send
# later variants back to eager with only a warning.
RECOMPILE_LIMIT = 64

_budget_compiled: float | None = None  # the activation memory budget this process last compiled layers with


def compile_decoder_layers(model: torch.nn.Module, device: torch.device, memory_budget: float = 1.0) -> list[str]:
    """Compile every decoder layer of `model` (PEFT-wrapped or not) in place; the names compiled.

    The layers are the modules of the classes the model names as never to be split across
    devices (`_no_split_modules`: LlamaDecoderLayer and the like), the repeated block of a
    transformer. ConfigError when there are none or the compiler's backend is missing.

    memory_budget (train.compile_memory_budget) is torch's activation_memory_budget: below 1 the
    partitioner that splits each compiled layer into forward and backward keeps that share of
    what it would save, and recomputes the rest in the backward, the ops with the fewest FLOPs
    first. It is read when a layer is traced, so it is set for the process; and since the
    compiled code of one model's layers serves another's, a new budget drops what was compiled.
    """
    _check_backend(device)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kinds = set(getattr(base, "_no_split_modules", None) or ())
    layers = [(name, module) for name, module in base.named_modules() if type(module).__name__ in kinds]
    if not layers:
        raise ConfigError(f"train.compile: found no decoder layers to compile in {type(base).__name__} (it names "
                          f"no _no_split_modules classes that it holds); set train.compile: false")
    import torch._dynamo.config
    import torch._functorch.config

    global _budget_compiled
    if _budget_compiled is not None and _budget_compiled != memory_budget:
        torch._dynamo.reset()  # else the layers compiled with the old budget would be reused as they are
    torch._functorch.config.activation_memory_budget = memory_budget
    _budget_compiled = memory_budget
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for _, layer in layers:
        layer.compile(dynamic=True)
    return [name for name, _ in layers]


def _check_backend(device: torch.device) -> None:
    """Inductor generates C++ on a CPU and Triton on a GPU; say so now, not at the first step."""
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            raise ConfigError("train.compile needs Triton on a GPU (CUDA builds of torch ship it: pip install "
                              "triton), or set train.compile: false") from None
        return
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as error:  # whatever the probe raises, the fix is the same
        raise ConfigError(f"train.compile on the {device.type} needs a C++ compiler for torch.compile ({error}); "
                          "install gcc or clang, or set train.compile: false") from None
