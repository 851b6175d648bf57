"""`expert export --merge`: the adapter folded into the base's weights, one plain transformers model.

What serving stacks without LoRA support, and conversions such as llama.cpp's to GGUF, take. Into
which weights:
- a float base (quantize.method none): its own;
- a GPTQ base: its dequantized weights, so the merged model computes what the scored expert
  computed, to float rounding (gptqmodel's torch kernel multiplies by the very same weights);
- an NF4 base: the float weights it was quantized from as it loaded, QLoRA's usual merge: it
  differs from the scored expert by NF4's rounding.
The merge runs on the CPU, in `dtype`, and needs the memory of the model at that dtype.
"""

from __future__ import annotations

from pathlib import Path

import torch

from expert.errors import ExpertError


def merged_dtype(dtype: str, weights_dir: Path) -> str:
    """`dtype` by name; "auto": the base checkpoint's own float dtype (float32 when it names none)."""
    from expert.modeling import stored_dtype

    if dtype != "auto":
        return dtype
    return str(stored_dtype(weights_dir) or torch.float32).removeprefix("torch.")


def merge_adapter(model_dir: Path, kind: str, adapter_dir: Path, out: Path, dtype: str) -> None:
    """Write base + adapter as one model into `out` (a transformers model folder, with its tokenizer)."""
    from peft import PeftModel

    from expert.gptq_kernel import layer_kernel
    from expert.modeling import load_model, resolve_base, resolve_dtype
    from expert.train.frozen import dense_gptq_layers

    torch_dtype = resolve_dtype(dtype, torch.device("cpu"), model_dir)  # a name: as given
    if kind == "gptq":
        # The training load takes gptqmodel's torch kernel, whose layers dequantize as the CPU
        # training run does (expert/train/frozen.py).
        model, tokenizer = load_model(model_dir, training=True, device="cpu", dtype=dtype)
        dense_gptq_layers(model, torch_dtype)
        left = layer_kernel(model)
        if left:
            raise ExpertError(f"--merge: some GPTQ layers of {model_dir} could not be dequantized ({left}: they do "
                              "more than dequantize and multiply); export without --merge, as base + adapter")
        _forget_quantization(model)
    else:
        model, tokenizer = load_model(resolve_base(model_dir), device="cpu", dtype=dtype)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    merged.save_pretrained(out, max_shard_size="5GB")
    tokenizer.save_pretrained(out)


def _forget_quantization(model: torch.nn.Module) -> None:
    """Every layer is a plain linear now: drop what marks the model GPTQ, or PEFT refuses to merge
    and save_pretrained writes a quantization_config that no weight matches."""
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
