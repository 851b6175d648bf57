"""Load a model folder (and optionally a PEFT adapter) for scoring.

A thin layer over `expert.modeling.load_model`, the one loader of the pipeline: the model
folder may be a plain Hugging Face folder, a GPTQ folder or a quantize-stage record (nf4,
none), and a wrong path fails with a message that lists what is missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from expert import modeling


@dataclass
class LoadedModel:
    """A model ready for scoring: eval mode, on `device`, with its tokenizer."""

    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype


def load_model(model_dir: Path, adapter_dir: Path | None = None, device: str = "auto",
               dtype: str = "auto") -> LoadedModel:
    """Load model + tokenizer from `model_dir`, then the LoRA adapter if one is given."""
    model_dir = Path(model_dir)
    torch_device = modeling.resolve_device(device)
    dtype = scoring_dtype(dtype, torch_device)
    torch_dtype = modeling.resolve_dtype(dtype, torch_device, modeling.resolve_base(model_dir))
    model, tokenizer = modeling.load_model(model_dir, adapter_dir=adapter_dir and Path(adapter_dir),
                                           training=False, device=device, dtype=dtype)
    return LoadedModel(model=model.eval(), tokenizer=tokenizer, device=torch_device, dtype=torch_dtype)


def scoring_dtype(dtype: str, device: torch.device) -> str:
    """eval.dtype as scoring takes it: 'auto' on a CPU that multiplies bf16 in hardware is bfloat16.

    Scoring is forward only, so bf16's rounding reaches the scores but no gradient, as on a GPU,
    where 'auto' is a 16-bit dtype too (lm-eval's default, the checkpoint's dtype, is bf16 for
    SmolLM2's own). On an AMD EPYC with AVX512-BF16, 2 threads, PubMedQA's 500 test questions on
    SmolLM2-135M: 5.9 questions/s in bf16 against 2.2 in float32; 6 of the 500 answers changed,
    and the accuracy did not (43.4% both).
    Elsewhere the CPU emulates bf16, slower than float32: 'auto' stays float32 there.
    """
    if dtype == "auto" and device.type == "cpu" and modeling.cpu_has_native_bf16():
        return "bfloat16"
    return dtype
