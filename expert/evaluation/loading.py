"""Load a model folder (and optionally a PEFT adapter) for scoring.

A model folder is a standard Hugging Face folder (config.json, weights, tokenizer files);
an adapter folder is what `PeftModel.save_pretrained` writes (adapter_config.json plus
adapter weights). Both are checked before loading so that a wrong path fails with a
message that lists what is missing instead of a hub lookup error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from expert.errors import ConfigError, ModelError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A model ready for scoring: eval mode, on `device`, with its tokenizer."""

    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"eval.device: unknown device {device!r}; use 'auto', 'cpu' or 'cuda[:N]'") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"eval.device is {device!r} but no CUDA GPU is visible; use 'cpu' or 'auto'")
    return resolved


def resolve_dtype(dtype: str, device: torch.device, model_dir: Path) -> torch.dtype:
    """float32 on CPU for 'auto'; on a GPU the checkpoint's 16-bit dtype, else bfloat16."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cpu":
        return torch.float32
    config = json.loads((model_dir / "config.json").read_text())
    stored = config.get("dtype") or config.get("torch_dtype")
    return _HALF.get(stored, torch.bfloat16)


def check_model_dir(model_dir: Path) -> None:
    """Raise ModelError naming the missing files of a Hugging Face model folder."""
    if not model_dir.is_dir():
        raise ModelError(f"model folder {model_dir} does not exist; run the import stage first "
                         "(`expert import`) or point eval at a Hugging Face model folder")
    missing = [] if (model_dir / "config.json").is_file() else ["config.json"]
    if not any((model_dir / name).is_file() for name in _TOKENIZER_FILES):
        missing.append("a tokenizer (one of " + ", ".join(_TOKENIZER_FILES) + ")")
    if not list(model_dir.glob("*.safetensors")) and not list(model_dir.glob("*.bin")):
        missing.append("weights (*.safetensors or *.bin)")
    if missing:
        raise ModelError(f"model folder {model_dir} lacks {'; '.join(missing)}; it should be "
                         "written by `save_pretrained` of both the model and its tokenizer")


def check_adapter_dir(adapter_dir: Path) -> None:
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelError(f"adapter folder {adapter_dir} lacks adapter_config.json; point eval at "
                         "the folder written by the train stage (PeftModel.save_pretrained)")


def load_model(model_dir: Path, adapter_dir: Path | None = None, device: str = "auto",
               dtype: str = "auto") -> LoadedModel:
    """Load model + tokenizer from `model_dir`, then the LoRA adapter if one is given."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    check_model_dir(model_dir)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
    if adapter_dir is not None:
        model = _attach_adapter(model, Path(adapter_dir))
    model.to(torch_device).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, device=torch_device, dtype=torch_dtype)


def _attach_adapter(model: torch.nn.Module, adapter_dir: Path) -> torch.nn.Module:
    from peft import PeftModel

    check_adapter_dir(adapter_dir)
    return PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
