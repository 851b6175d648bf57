"""Configuration of the evaluation stage (`EvalConfig`).

The canonical JSON of this config goes into the evaluate stage's cache key, so every
field that changes a score or a prediction lives here; fields that only change speed
(`batch_size`, `prefix_cache`) are here too because they are worth recording.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from expert.config import StageConfig


class EvalConfig(StageConfig):
    """How to score a model on PubMedQA (zero-shot) and MMLU (5-shot)."""

    batch_size: int = Field(
        8,
        ge=1,
        description="Sequences per forward pass. Sequences are sorted by length and each batch "
        "is padded only to its own longest member, so a larger batch wastes little padding.",
    )
    max_length: int | None = Field(
        None,
        ge=2,
        description="Context window in tokens; longer inputs lose tokens from the left, as in "
        "lm-evaluation-harness. None: the model's own limit (config n_positions / "
        "max_position_embeddings / n_ctx, else the tokenizer's model_max_length, else 2048).",
    )
    mmlu_subjects: list[str] | None = Field(
        None,
        description="Evaluate only these MMLU subjects (names as in the data, e.g. "
        "'college_biology'). None: all subjects present in the data.",
    )
    mmlu_max_per_subject: int | None = Field(
        None,
        ge=1,
        description="At most this many questions per MMLU subject: the first N in file order.",
    )
    pubmedqa_split: Literal["test", "dev"] = Field(
        "test", description="Which PubMedQA split to score (the Parquet file of that name)."
    )
    device: str = Field(
        "auto", description="'auto' (CUDA when available, else CPU), 'cpu', 'cuda', 'cuda:1', ..."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Weights' dtype. 'auto': float32 on CPU (half precision is slow and less "
        "exact there); on a GPU the checkpoint's 16-bit dtype, else bfloat16.",
    )
    prefix_cache: bool = Field(
        True,
        description="MMLU: run the 5-shot prefix once per subject and reuse its KV cache for "
        "all that subject's questions. Same scores to float tolerance, several times faster.",
    )

    @field_validator("mmlu_subjects")
    @classmethod
    def _non_empty(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("give at least one subject, or null for all subjects")
        return value
