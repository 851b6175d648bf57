"""Configuration of the evaluation stage (`EvalConfig`).

The canonical JSON of this config goes into the evaluate stage's cache key, so every
field that changes a score or a prediction lives here; fields that only change speed
(`batch_size`, `prefix_cache`) are here too because they are worth recording. `runner`
says only where the scoring runs, never what it computes, so it is left out of the key:
switching it reuses every cached evaluation.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from expert.config import StageConfig

# The devices torch names that scoring can run on.
_DEVICE = re.compile(r"^(auto|cpu|mps|(cuda|xpu)(:\d+)?)$")
# A dask scheduler address as `distributed.Client` takes it: tcp://host:8786, tls://..., host:8786,
# and an IPv6 host in brackets (tcp://[::1]:8786), since its own colons would end a bare host.
_ADDRESS = re.compile(r"^([a-z]+://)?([^\s:/\[\]]+|\[[0-9a-fA-F:.]+\]):\d+$")
# gptqmodel's GPTQ inference kernels, by its names without their "gptq_" prefix: CUDA ones first
# (machete: Hopper; marlin: Ampere and newer; exllama_v2; triton, also Intel XPU), then those that
# run anywhere (torch), or on CPUs and XPUs (torch_fused, torch_aten).
InferenceKernel = Literal["auto", "machete", "marlin", "exllama_v2", "triton", "torch", "torch_fused",
                          "torch_aten"]


class RunnerConfig(StageConfig):
    """Where evaluation and checkpoint selection score: here, or in pieces on a dask cluster."""

    kind: Literal["local", "dask"] = Field(
        "local",
        description="'local': one process, as the stage's own task. 'dask': split into pieces (groups of "
        "whole MMLU subjects, PubMedQA shards, one checkpoint each) run as Prefect tasks through "
        "prefect-dask's DaskTaskRunner, then merged into the same outputs.",
    )
    address: str | None = Field(
        None,
        description="dask: scheduler of a running cluster, e.g. 'tcp://10.0.0.5:8786' (`dask scheduler` + "
        "`dask worker ADDRESS` on each machine, with this project installed). None: start a "
        "LocalCluster of `workers` processes for each evaluation.",
    )
    workers: int | None = Field(
        None, ge=1, description="dask without address: LocalCluster worker processes (None: 2).")
    threads_per_worker: int = Field(
        1, ge=1, description="dask without address: torch threads of each LocalCluster worker process "
        "(each scores one piece at a time).")
    pieces: int | None = Field(
        None, ge=1,
        description="dask: pieces per benchmark evaluation (None: one per worker). Selection always "
        "scores one checkpoint per piece.",
    )

    timeout_s: float | None = Field(
        None, gt=0,
        description="dask: the longest the stage waits for all its pieces, in seconds (None: no limit). Past it "
        "the stage fails naming the pieces still unfinished, instead of waiting for ever on a hung or lost "
        "worker (a scheduler whose workers all left queues the pieces until one joins).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> RunnerConfig:
        problems = []
        if self.kind == "local":
            chosen = [f for f in ("address", "workers", "pieces", "timeout_s") if getattr(self, f) is not None]
            if chosen:
                problems.append(f"{', '.join(chosen)}: used with kind 'dask' only; set kind: dask, or remove them")
        if self.address is not None and not _ADDRESS.match(self.address):
            problems.append(f"address {self.address!r} is not a scheduler address; give e.g. 'tcp://host:8786' "
                            "(an IPv6 host in brackets: 'tcp://[::1]:8786')")
        if self.address is not None and self.workers is not None:
            problems.append("give address (a running cluster) or workers (a LocalCluster started here), not both")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def local_workers(self) -> int:
        return self.workers or 2


class EvalConfig(StageConfig):
    """How to score a model on PubMedQA (zero-shot) and MMLU (k-shot: data.mmlu.num_shots)."""

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
        description="Weights' dtype. 'auto': on a GPU the checkpoint's 16-bit dtype, else bfloat16; on a "
        "CPU bfloat16 where it multiplies bf16 in hardware (AVX512-BF16 or AMX: 2.6x float32's speed "
        "measured), else float32 (emulated bf16 is slower).",
    )
    gptq_kernel: InferenceKernel = Field(
        "auto",
        description="gptqmodel's kernel for a GPTQ model's scoring (evaluation and checkpoint selection). "
        "'auto': gptqmodel's choice (on a Hopper GPU Machete, whose CUTLASS sources it downloads; "
        "without them EXPERT takes Marlin, which gptqmodel builds on first use), except a CPU scoring in "
        "bf16 where the dequantized weights fit, which keeps them (torch). A kernel that cannot run the "
        "model on eval.device fails before the load, with the ones that can. Ignored for other models.",
    )
    prefix_cache: bool = Field(
        True,
        description="MMLU: run the k-shot prefix once per subject and reuse its KV cache for "
        "all that subject's questions. Same scores to float tolerance, several times faster.",
    )

    runner: RunnerConfig = Field(
        default_factory=RunnerConfig,
        description="Where the scoring runs (not part of any cache key): see RunnerConfig.",
    )

    def canonical(self) -> dict[str, Any]:
        # gptq_kernel is left out at 'auto', so evaluations cached before it existed stay valid.
        # A named kernel stays in: kernels round differently, so its scores may differ.
        return {k: v for k, v in super().canonical().items()
                if k != "runner" and not (k == "gptq_kernel" and v == "auto")}

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        # Checked here, not when select first loads a model after quantize and train have run.
        if not _DEVICE.match(value):
            raise ValueError("must be 'auto', 'cpu', 'mps', or 'cuda' / 'xpu' with an optional index ('cuda:1')")
        return value

    @field_validator("mmlu_subjects")
    @classmethod
    def _non_empty(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("give at least one subject, or null for all subjects")
        return value
