"""GPTQ through the public path: transformers' `GPTQConfig` -> optimum -> gptqmodel.

`from_pretrained(base, quantization_config=GPTQConfig(...))` loads the full-precision model and
quantizes it block by block in place, so only one full-precision copy is ever in memory. The
calibration samples are handed over already tokenized, so `max_length` is exact.

    check_group_size(model_dir, 64)             # before spending any time
    run_gptq(config, model_dir, samples, out)   # writes the quantized HF folder
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch

from expert.errors import ConfigError
from expert.quantize.config import GROUP_SIZES, QuantizeConfig

_WORKERS_ENV = "GPTQMODEL_CPU_WORKERS"


def quantized_layer_sizes(model_dir: Path) -> dict[str, int]:
    """Input size of every linear layer GPTQ will quantize (those inside the repeated blocks).

    Built on the meta device from config.json: no weights are read. Uses optimum's own block and
    layer discovery, so the list is exactly what optimum quantizes.
    """
    from optimum.gptq.utils import get_block_name_with_pattern, get_layers
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    block_name = get_block_name_with_pattern(model)
    blocks = model.get_submodule(block_name)
    sizes = {}
    for i, block in enumerate(blocks):
        for name, layer in get_layers(block).items():
            sizes[f"{block_name}.{i}.{name}"] = int(layer.weight.shape[-1])
    return sizes


def check_group_size(model_dir: Path, group_size: int) -> None:
    """Raise ConfigError naming the layers whose input size `group_size` does not divide."""
    if group_size == -1:
        return
    sizes = quantized_layer_sizes(model_dir)
    bad = {name: size for name, size in sizes.items() if size % group_size}
    if not bad:
        return
    fitting = [g for g in GROUP_SIZES if all(s % g == 0 for s in sizes.values())] + [-1]
    by_size: dict[int, list[str]] = {}
    for name, size in bad.items():
        by_size.setdefault(size, []).append(name)
    detail = "; ".join(f"input size {size}: {len(names)} layers (e.g. {names[0]})"
                       for size, names in sorted(by_size.items()))
    raise ConfigError(
        f"quantize.group_size {group_size} does not divide the input size of {len(bad)} of the "
        f"{len(sizes)} layers to quantize ({detail}). Group sizes that fit every layer: "
        f"{', '.join(map(str, fitting))} (-1 = one group per row).")


# Layers that read the same input, in block order (Llama, Mistral, Qwen2 names). optimum's default
# runs every calibration sample through the block once per layer (7 passes for a Llama block);
# grouping them as GPTQ implementations do takes 4 passes, with the same inputs per layer.
_LLAMA_GROUPS = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                 ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def sequential_groups(layer_names: list[str]) -> list[list[str]] | None:
    """The Llama grouping when a block holds exactly those layers, else None (optimum: one by one)."""
    in_block = {name.split(".", 3)[3] for name in layer_names}  # drop "model.layers.N."
    return _LLAMA_GROUPS if in_block == {n for group in _LLAMA_GROUPS for n in group} else None


def gptq_config(config: QuantizeConfig, samples: list[dict[str, torch.Tensor]], tokenizer: Any,
                groups: list[list[str]] | None = None):
    from transformers import GPTQConfig

    return GPTQConfig(
        bits=config.bits, group_size=config.group_size, desc_act=config.desc_act, sym=config.sym,
        damp_percent=config.damp_percent, dataset=samples, tokenizer=tokenizer,
        pad_token_id=tokenizer.pad_token_id, model_seqlen=config.max_length,
        modules_in_block_to_quantize=groups,
    )


def run_gptq(config: QuantizeConfig, model_dir: Path, samples: list[dict[str, torch.Tensor]],
             tokenizer: Any, out_dir: Path) -> None:
    """Quantize `model_dir` with `samples` and save model + tokenizer into `out_dir`."""
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    groups = sequential_groups(list(quantized_layer_sizes(model_dir)))
    with cpu_workers():
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=_quantize_dtype(model_dir, device), device_map={"": device},
            quantization_config=gptq_config(config, samples, tokenizer, groups))
    # The calibration tensors and the tokenizer object ride along in the config; they are inputs,
    # not settings, and tensors are not JSON.
    model.config.quantization_config.dataset = None
    model.config.quantization_config.tokenizer = None
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    del model


def _quantize_dtype(model_dir: Path, device: torch.device) -> torch.dtype:
    """The checkpoint's own dtype, so unquantized tensors (embeddings, norms) keep their size;
    float32 instead of float16 on a CPU, where half matmuls are slow or missing."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    stored = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "float32"), None)
    if not isinstance(stored, torch.dtype) or (device.type == "cpu" and stored == torch.float16):
        return torch.float32
    return stored


@contextlib.contextmanager
def cpu_workers() -> Iterator[None]:
    """gptqmodel sizes its CPU pool at ~cores/2 but one of its pools asks for 2 workers, so on a
    2-core machine quantization fails ("Virtual pool ... requests 2 workers"). Set the override
    for the duration of the call, only if the user has not set it, and restore it after."""
    if os.environ.get(_WORKERS_ENV) is not None:
        yield
        return
    os.environ[_WORKERS_ENV] = str(max(2, ((os.cpu_count() or 1) + 1) // 2))
    try:
        yield
    finally:
        os.environ.pop(_WORKERS_ENV, None)
