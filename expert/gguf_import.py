"""Import a GGUF checkpoint into a plain Hugging Face folder (safetensors + config + tokenizer).

transformers reads GGUF directly (dequantizing every tensor to float), but a model loaded that
way carries a `quantization_config` of method "gguf" and refuses `save_pretrained` ("quantized
with gguf and is not serializable"). So we load it once, build a plain model of the same config
without that entry, move the state dict over strictly, and save that. Later stages only ever see
the HF folder and never parse GGUF again.

    info = import_gguf(Path("model.Q4_1.gguf"), Path("out/"), dtype="auto")
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from expert.errors import ModelError

# GGUF stores no "original" dtype: dequantized weights are float32 unless asked otherwise.
_DTYPES = {"auto": "float32", "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def read_gguf_header(path: Path) -> dict:
    """Architecture, name and tokenizer presence of a GGUF file; ModelError if it is not one."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError, struct.error, IndexError... on bad bytes
        raise ModelError(
            f"cannot read GGUF file '{path}': {type(exc).__name__}: {exc}. The file is corrupt, "
            "truncated or not GGUF; download it again (compare its sha256 with the publisher's) "
            "or point model.source at another file."
        ) from None
    fields = reader.fields
    return {
        "architecture": _field_str(fields, "general.architecture"),
        "name": _field_str(fields, "general.name"),
        "has_tokenizer": "tokenizer.ggml.tokens" in fields,
        "n_tensors": len(reader.tensors),
    }


def _field_str(fields, key: str) -> str | None:
    field = fields.get(key)
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")


def check_gguf_supported(path: Path, header: dict) -> None:
    """Fail early, naming the file, on what transformers cannot turn into a model + tokenizer."""
    arch = header["architecture"]
    if arch is None:
        raise ModelError(f"GGUF file '{path}' has no general.architecture; it is not a model file.")
    supported = _supported_architectures()
    if supported is not None and arch not in supported:
        raise ModelError(
            f"GGUF file '{path}' holds a '{arch}' model, which transformers cannot load from GGUF "
            f"(it supports: {', '.join(sorted(supported))}). Use the original Hugging Face "
            "checkpoint instead (model.source: hf:ORG/NAME or a local folder)."
        )
    if not header["has_tokenizer"]:
        raise ModelError(
            f"GGUF file '{path}' has no tokenizer (no tokenizer.ggml.tokens metadata); re-export "
            "it with llama.cpp's convert_hf_to_gguf.py, or use the original Hugging Face checkpoint."
        )


def _supported_architectures() -> set[str] | None:
    # A private constant: if a transformers release moves it, we skip the early check and
    # let from_pretrained's own error (wrapped below) speak.
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError:
        return None
    return set(GGUF_SUPPORTED_ARCHITECTURES)


def load_gguf(path: Path, dtype: str = "auto"):
    """(model, tokenizer) as transformers loads them from GGUF; the model is still GGUF-flagged."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    header = read_gguf_header(path)
    check_gguf_supported(path, header)
    folder, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, _DTYPES[dtype]))
    except (ValueError, KeyError, RuntimeError, NotImplementedError) as exc:
        raise ModelError(
            f"transformers could not load GGUF file '{path}' ({header['architecture']} model): "
            f"{type(exc).__name__}: {exc}. Use the original Hugging Face checkpoint instead."
        ) from exc
    return model.eval(), tokenizer


def to_plain_model(gguf_model):
    """The same weights in a model with no GGUF quantization flag, so it can be saved.

    The plain model is built with empty (meta) parameters and takes over the GGUF model's
    tensors (`assign=True`): peak memory stays one copy of the weights, not two. Buffers are
    created for real because the non-persistent ones (rotary `inv_freq`) are not in the state dict.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    _tidy_floats(config)
    dtype = next(gguf_model.parameters()).dtype
    with init_empty_weights(include_buffers=False):
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = gguf_model.state_dict()
    # strict: any renamed or missing tensor is a bug, not something to paper over.
    plain.load_state_dict(state, strict=True, assign=True)
    plain.tie_weights()
    leftovers = [n for n, t in [*plain.named_parameters(), *plain.named_buffers()] if t.is_meta]
    if leftovers:
        raise ModelError(f"GGUF import left tensors uninitialised: {leftovers[:5]} (a bug: please report)")
    plain.generation_config = copy.deepcopy(gguf_model.generation_config)
    return plain.eval()


def _tidy_floats(config) -> None:
    """GGUF stores floats as float32: write 1e-05, not 9.999999747378752e-06. The value is the
    same once cast to float32, which is how the model uses it, so logits do not change."""
    for key, value in config.to_diff_dict().items():
        if isinstance(value, float) and float(np.float32(value)) == value:
            setattr(config, key, float(str(np.float32(value))))


def import_gguf(path: Path, out_dir: Path, dtype: str = "auto") -> dict:
    """Write `path` (a GGUF file) as an HF folder into `out_dir`; return what was written."""
    gguf_model, tokenizer = load_gguf(path, dtype)
    plain = to_plain_model(gguf_model)
    del gguf_model
    from expert.models import check_special_tokens

    check_special_tokens(tokenizer, path)
    vocab = plain.config.vocab_size
    if len(tokenizer) > vocab:
        raise ModelError(
            f"GGUF file '{path}': its tokenizer has {len(tokenizer)} tokens but the model's "
            f"embedding only {vocab}; the file's metadata is inconsistent, re-export it."
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"architecture": type(plain).__name__, "model_type": plain.config.model_type}
