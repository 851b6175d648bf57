"""LoRA on a loaded base model, its optimizer and its learning-rate schedule.

`attach_lora` checks that every target module exists before PEFT sees the config, so a typo
fails with the list of linear modules the model really has. 'all-linear' is resolved here too,
by module class name, so that quantized linear layers (bitsandbytes `Linear4bit`, GPTQ
`*QuantLinear`, which is not a `torch.nn.Linear`) are found as well; the output head is
never targeted.
"""

from __future__ import annotations

import math

import torch

from expert.errors import ConfigError
from expert.modeling import known_warnings_muted
from expert.train.compiling import compile_decoder_layers
from expert.train.config import TrainConfig
from expert.train.lean import make_lean
from expert.train.logging import log
from expert.train.recompute import set_checkpointing


def linear_module_names(model: torch.nn.Module) -> dict[str, list[str]]:
    """Leaf name -> full names of the model's linear layers (quantized ones included), head excluded."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names: dict[str, list[str]] = {}
    for full, module in model.named_modules():
        if module is head or not full:
            continue
        if isinstance(module, torch.nn.Linear) or type(module).__name__.endswith("Linear"):
            names.setdefault(full.rsplit(".", 1)[-1], []).append(full)
    return names


def resolve_targets(model: torch.nn.Module, config: TrainConfig) -> list[str]:
    """The leaf names LoRA goes on; ConfigError naming the missing ones."""
    linear = linear_module_names(model)
    if config.target_modules == "all-linear":
        if not linear:
            raise ConfigError("train.target_modules is 'all-linear' but the model has no linear layers")
        return sorted(linear)
    missing = [name for name in config.target_modules if name not in linear]
    if missing:
        raise ConfigError(
            f"train.target_modules: {', '.join(missing)} not found among the model's linear modules; "
            f"it has: {', '.join(sorted(linear))} (or use 'all-linear')"
        )
    return list(config.target_modules)


def attach_lora(model: torch.nn.Module, config: TrainConfig):
    """Wrap `model` with fresh LoRA weights (seeded by the caller); only they require grad.

    With train.lean_activations the LoRA layers, norms and MLPs then keep less for the backward
    (`expert.train.lean`): a bigger micro-batch fits without gradient checkpointing, for the same
    numbers. With train.compile every decoder layer is then compiled (`expert.train.compiling`).
    """
    from peft import LoraConfig, get_peft_model

    targets = resolve_targets(model, config)
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    # An explicit `true` is switched on before wrapping; 'auto' is decided by memory.plan_memory.
    set_checkpointing(model, config.gradient_checkpointing is True)
    model.config.use_cache = False
    with known_warnings_muted():
        model = get_peft_model(model, lora)
    if config.lean_activations:
        switched = make_lean(model)
        log.debug("lean activations: %(lora)d LoRA layers, %(rmsnorm)d RMSNorms, %(mlp)d MLPs", switched)
    if config.compile:  # after the lean switch: the compiler traces the forwards the run will use
        device = next(model.parameters()).device
        compiled = compile_decoder_layers(model, device, config.compile_memory_budget)
        log.info("train.compile: %d decoder layers compiled on first use (%s, ...)%s", len(compiled), compiled[0],
                 f"; the compiler keeps {config.compile_memory_budget:g} of their activations for the backward, "
                 "recomputing the rest" if config.compile_memory_budget < 1 else "")
        if device.type == "cpu":
            log.info("train.compile on the CPU: the first step compiles (seconds to a minute); after it a bf16 "
                     "SmolLM2-135M step ran 1.1x faster than eager (bench/README.md), so it pays on long runs")
    return model


def name_base(model, name: str) -> None:
    """What the adapters `model` saves call their base: adapter_config.json's
    base_model_name_or_path, and the model card's base_model (the base's config) and tags (the
    base model's name_or_path)."""
    for config in model.peft_config.values():
        config.base_model_name_or_path = name
    base = model.get_base_model()
    base.config._name_or_path = name
    base.name_or_path = name


def make_optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError(f"train.optimizer '{config.optimizer}' needs bitsandbytes: pip install bitsandbytes, "
                          "or use optimizer: adamw") from None
    cls = bnb.optim.AdamW8bit if config.optimizer == "adamw_8bit" else bnb.optim.PagedAdamW8bit
    return cls(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """Multiplier of the peak lr for 0-based optimizer step `step`.

    Warmup reaches the peak at step warmup-1 (the first update is not wasted at lr 0, as
    with transformers' schedules); linear and cosine decay end one step after the last
    update, so the last update still moves.
    """
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    """A LambdaLR over `lr_factor`; its state_dict is plain numbers (JSON-ready)."""
    warmup, kind = config.warmup_steps, config.lr_scheduler
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total_steps, kind))
