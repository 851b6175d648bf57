"""QuantizeConfig: how the quantize stage turns the imported base model into a 4-bit model."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from expert.config import StageConfig

GPTQ_BITS = (2, 3, 4, 8)  # what transformers' GPTQConfig accepts; 4 is the tested one
# Group sizes gptqmodel's kernels are built for (-1: one group per output row).
GROUP_SIZES = (16, 32, 64, 128, 256, 512, 1024)
# The fields every method uses (the rest are GPTQ's): the perplexity check's, and the method.
COMMON_FIELDS = ("method", "perplexity_samples", "max_length", "seed")


class QuantizeConfig(StageConfig):
    method: Literal["gptq", "nf4", "none"] = Field(
        "gptq", description="gptq: GPTQ with gptqmodel, weights written (a folder transformers loads); "
        "nf4: bitsandbytes 4-bit NF4 at load time (only the settings are recorded); "
        "none: the base model as is (full-precision LoRA, e.g. on the CPU)")
    bits: int = Field(4, description=f"GPTQ bits, one of {GPTQ_BITS}; nf4 is always 4")
    group_size: int = Field(
        64, description="GPTQ columns sharing one scale; must divide every quantized layer's input "
        "size (SmolLM2-135M: 576 and 1536, so 64 fits and 128 does not); -1 = whole rows")
    desc_act: bool = Field(False, description="GPTQ act-order: quantize columns by decreasing "
                           "activation; a little more accurate, slower kernels")
    act_group_aware: bool = Field(
        True, description="GPTQ group-aware reordering (gptqmodel's default): quantize columns "
        "by decreasing activation within each group, keeping the plain group layout and fast kernels; "
        "applies when desc_act is false (act-order replaces it)")
    sym: bool = Field(True, description="symmetric quantization (no zero point per group)")
    # gptqmodel's own default (transformers' GPTQConfig says 0.1; gptqmodel uses 0.05 for GPTQ).
    damp_percent: float = Field(0.05, gt=0, lt=1, description="Hessian dampening, as a fraction "
                                "of its mean diagonal")
    calibration: str = Field(
        "task", description="'task': the formatted data folder's train.parquet (prompt + ' ' + "
        "answer), i.e. domain calibration; or the path of a UTF-8 text file")
    num_samples: int = Field(128, ge=1, description="calibration samples")
    max_length: int = Field(512, ge=8, description="tokens per calibration sample (and per "
                            "perplexity text), at most")
    seed: int = Field(0, description="seeds the choice of calibration samples and perplexity texts")
    perplexity_samples: int = Field(32, ge=0, description="dev texts (prompt + ' ' + answer) for "
                                    "the perplexity of the unquantized vs the quantized model; 0 skips")

    @field_validator("bits")
    @classmethod
    def _bits(cls, bits: int) -> int:
        if bits not in GPTQ_BITS:
            raise ValueError(f"must be one of {GPTQ_BITS}")
        return bits

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, size: int) -> int:
        if size != -1 and size not in GROUP_SIZES:
            raise ValueError(f"must be -1 or one of {GROUP_SIZES}")
        return size

    def canonical(self) -> dict[str, Any]:
        """Only the fields that apply to the method: a GPTQ setting changed under nf4 or none
        changes nothing those write, so it must not change their key (and rerun training)."""
        out = super().canonical()
        return out if self.method == "gptq" else {k: out[k] for k in COMMON_FIELDS}

    @model_validator(mode="after")
    def _nf4_is_4bit(self) -> "QuantizeConfig":
        if self.method == "nf4" and self.bits != 4:
            raise ValueError(f"method nf4 is 4-bit only; remove 'bits' (got {self.bits})")
        return self
