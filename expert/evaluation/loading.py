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
from expert.gptq_kernel import layer_kernel


@dataclass
class LoadedModel:
    """A model ready for scoring: eval mode, on `device`, with its tokenizer."""

    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    gptq_kernel: str | None = None  # gptqmodel's layer class that scores a GPTQ model, e.g. MarlinLinear

    @property
    def precision(self) -> dict[str, str | None]:
        """What kept scores must share to be reused: device kind, dtype and GPTQ kernel ('auto'
        resolves each by machine, and two roundings must not merge into one result)."""
        return {"device": self.device.type, "dtype": str(self.dtype).removeprefix("torch."),
                "gptq_kernel": self.gptq_kernel}


def load_model(model_dir: Path, adapter_dir: Path | None = None, device: str = "auto",
               dtype: str = "auto", gptq_kernel: str = "auto") -> LoadedModel:
    """Load model + tokenizer from `model_dir`, then the LoRA adapter if one is given.

    device, dtype, gptq_kernel: as eval.device, eval.dtype and eval.gptq_kernel take them."""
    model_dir = Path(model_dir)
    torch_device = modeling.resolve_device(device)
    dtype = scoring_dtype(dtype, torch_device)
    torch_dtype = modeling.resolve_dtype(dtype, torch_device, modeling.resolve_base(model_dir))
    model, tokenizer = modeling.load_model(model_dir, adapter_dir=adapter_dir and Path(adapter_dir),
                                           training=False, device=device, dtype=dtype, gptq_kernel=gptq_kernel)
    contiguous_head_input(model)
    return LoadedModel(model=model.eval(), tokenizer=tokenizer, device=torch_device, dtype=torch_dtype,
                       gptq_kernel=layer_kernel(model))


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


def contiguous_head_input(model: torch.nn.Module) -> None:
    """Hand the output head (lm_head) a contiguous input from now on.

    Scoring asks for the last positions' logits only (`logits_to_keep`), so the head gets
    hidden_states[:, -keep:, :] of a batch: a strided slice. torch.matmul folds such an input
    into one matrix product only while the weight requires grad; PEFT freezes the base, so
    under an adapter it took the batched path instead, which in bf16 on a CPU copied the whole
    vocabulary matrix once per row of the batch (8 x 49,152 x 576 for SmolLM2) on every
    forward: the head took 535 ms instead of 4 (float32: 25 instead of 10). That made the
    expert's PubMedQA evaluation 1.5x the quantized base's (127 vs 82 s, default pipeline, 2
    threads). Copying the few kept rows costs nothing measurable; the logits were the same to
    the bit (bench/README, eval_vs_lmeval.py).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        head.register_forward_pre_hook(_contiguous_first_argument)


def _contiguous_first_argument(module, args):
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(),) + tuple(args[1:])
    return None
