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
    torch_dtype = modeling.resolve_dtype(dtype, torch_device, modeling.resolve_base(model_dir))
    model, tokenizer = modeling.load_model(model_dir, adapter_dir=adapter_dir and Path(adapter_dir),
                                           training=False, device=device, dtype=dtype)
    return LoadedModel(model=model.eval(), tokenizer=tokenizer, device=torch_device, dtype=torch_dtype)
