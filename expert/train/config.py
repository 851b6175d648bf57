"""`TrainConfig`: every knob of the LoRA training stage, validated at construction.

Defaults are the original project's: LoRA r=8, alpha=16 on q_proj + v_proj, 10 epochs at an
effective batch of 50 with AdamW at 1e-4. Build one from YAML with
`TrainConfig.from_dict(data, where="train")` so errors name the field as the user wrote it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from expert.config import StageConfig


# Said at config time (the pipeline's quantize.method) and at launch (the model folder's kind).
FSDP_GPTQ = ("FSDP cannot shard a GPTQ base (its packed int32 qweight and scales are not plain weights "
             "it can flatten and split); use train.strategy: ddp (every GPU holds the whole 4-bit model) "
             "or quantize.method: nf4, which fsdp shards")

# gptqmodel's GPTQ kernels that train (a gradient through them), by its names without "gptq_":
# triton on CUDA and Intel XPU GPUs, torch anywhere.
TrainingKernel = Literal["auto", "triton", "torch"]


class TrainConfig(StageConfig):
    """How to train a LoRA adapter on a formatted benchmark's train split."""

    # LoRA
    lora_r: int = Field(8, gt=0, description="LoRA rank")
    lora_alpha: int = Field(16, gt=0, description="LoRA scaling numerator (scale = alpha / r)")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="dropout on the LoRA input")
    target_modules: list[str] | Literal["all-linear"] = Field(
        ["q_proj", "v_proj"],
        description="names (last name part) of the linear modules that get LoRA, or 'all-linear' "
                    "for every linear layer but the output head",
    )

    # Schedule
    epochs: float = Field(10, gt=0, description="passes over train.parquet (fractions allowed)")
    learning_rate: float = Field(1e-4, gt=0, description="peak learning rate")
    micro_batch_size: int | Literal["auto"] = Field(
        2, description="examples per forward pass, or 'auto': the largest that fits memory_limit_gib, a step's "
                       "effective_batch_size examples then split into near-equal micro-batches of at most that "
                       "many (see expert/train/memory.py)"
    )
    # Scale-out: declared before effective_batch_size, whose check reads them.
    processes: int = Field(
        1, ge=1, description="training processes (one per GPU), started by torchrun when more than 1; "
                             "each optimizer step's micro-batches are split among them"
    )
    strategy: Literal["single", "ddp", "fsdp"] = Field(
        "single", description="single: one process; ddp: every process holds the whole (quantized) base, "
                              "LoRA gradients are summed once per step; fsdp: the base's layers are sharded "
                              "across the processes (plain or nf4 bases, not gptq), for a base too big for one card"
    )
    effective_batch_size: int = Field(
        50, gt=0, description="examples per optimizer step (over all processes); a multiple of "
                              "micro_batch_size x processes"
    )
    warmup_steps: int = Field(10, ge=0, description="optimizer steps of linear warmup from 0")
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="decay after warmup: linear or cosine to 0, or constant"
    )
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = Field(
        "adamw", description="torch AdamW, or bitsandbytes' 8-bit (optionally paged) AdamW"
    )
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="clip the gradient norm to this before each step; null: no clipping"
    )

    # Data and memory
    max_length: int = Field(
        512, ge=8, description="tokens per example; longer prompts lose tokens from the left"
    )
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto", description="recompute activations in backward (a third more compute, far less memory); "
                            "'auto': only when the micro-batch does not fit memory_limit_gib without it, "
                            "and then only in as many layers as it needs"
    )
    lean_activations: bool = Field(
        True, description="keep less for the backward (expert/train/lean.py): the same numbers, a bigger "
                          "micro-batch without checkpointing; false: transformers + PEFT as they come"
    )
    compile: bool = Field(
        False, description="torch.compile each decoder layer (expert/train/compiling.py): fewer, fused kernels "
                           "and less Python per step, for tens of seconds of compiling at the start; the same "
                           "math, but dropout draws other masks than an eager run's. Not with strategy fsdp"
    )
    compile_memory_budget: float = Field(
        1.0, gt=0.0, le=1.0,
        description="with compile: the share of a layer's activations the compiler keeps for the backward; below 1 "
                    "it recomputes the cheapest of the rest there (elementwise work first), so a bigger micro-batch "
                    "fits with fewer layers checkpointed. The same gradients (CPU: bit for bit at 0.2 and 0.01). "
                    "Above 0: at 0 the gradients came out otherwise (dropout on)"
    )
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="what the matmuls compute in: 'bfloat16' runs the forward under bf16 autocast "
                            "(weights and optimizer state stay as they are), 'float32' without autocast; "
                            "'auto' is bfloat16 on GPUs and CPUs with native bf16 matmuls (Ampere or newer; "
                            "AVX512-BF16 or AMX), float32 elsewhere"
    )
    memory_limit_gib: float | None = Field(
        None, gt=0, description="GPU memory the run may use, for the 'auto' choices and the out-of-memory "
                                "hint; null: all the GPU memory free at start"
    )
    gptq_kernel: TrainingKernel = Field(
        "auto",
        description="gptqmodel's kernel for a GPTQ base while training. 'auto': on a GPU gptqmodel's "
        "trainable choice (triton as a rule), on a CPU torch (then dequantized once where that fits, "
        "see expert/train/frozen.py). Ignored for other bases.",
    )
    seed: int = Field(0, ge=0, description="seeds LoRA init, dropout and the data order")

    # Checkpoints, logs, dev loss
    save_every_steps: int = Field(10, gt=0, description="checkpoint every N optimizer steps (and at the end)")
    log_every_steps: int = Field(1, gt=0, description="log loss, lr, tokens/s, memory every N steps")
    dev_loss: bool = Field(True, description="answer-token loss on dev.parquet at every checkpoint")
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps (smoke runs)")

    @field_validator("micro_batch_size")
    @classmethod
    def _positive_micro(cls, value):
        if value != "auto" and value <= 0:
            raise ValueError("must be greater than 0 (or 'auto')")
        return value

    @field_validator("strategy")
    @classmethod
    def _strategy_fits_processes(cls, value: str, info: ValidationInfo) -> str:
        processes = info.data.get("processes")
        if processes is None:  # processes itself is invalid and reported
            return value
        if value == "single" and processes > 1:
            raise ValueError(f"'single' runs one process but processes is {processes}; use strategy ddp "
                             "(every process holds the whole base) or fsdp (the base is sharded), or processes 1")
        if value != "single" and processes == 1:
            raise ValueError(f"{value} needs processes of 2 or more (one per GPU); with one process use "
                             "strategy single")
        if value == "fsdp" and info.data.get("micro_batch_size") == "auto":
            # The memory probe's forward would need every process in step (see expert/train/memory.py).
            raise ValueError("fsdp needs a numeric micro_batch_size ('auto' probes memory one process at a "
                             "time); set micro_batch_size to e.g. 1 or 2, or use strategy ddp")
        return value

    @field_validator("effective_batch_size")
    @classmethod
    def _multiple_of_micro(cls, value: int, info: ValidationInfo) -> int:
        micro, processes = info.data.get("micro_batch_size"), info.data.get("processes") or 1
        # Every process takes the same number of micro-batches per step: the same work, and under
        # fsdp the same number of forwards, which must match because each one gathers the shards.
        unit = micro * processes if isinstance(micro, int) and micro > 0 else processes
        if value % unit:
            what = (f"micro_batch_size ({micro})" if processes == 1 else
                    f"processes ({processes})" if unit == processes else
                    f"micro_batch_size x processes ({micro} x {processes} = {unit})")
            raise ValueError(f"must be a multiple of {what}, e.g. {max(unit, value - value % unit)} or "
                             f"{value - value % unit + unit}")
        return value

    @field_validator("compile")
    @classmethod
    def _compile_not_sharded(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("strategy") == "fsdp":
            # FSDP gathers and frees each layer's shards around its forward and backward; a compiled
            # layer would need the compiler to trace that too, which is untested here.
            raise ValueError("is not supported with strategy fsdp; set compile: false, or use strategy ddp")
        return value

    @field_validator("target_modules")
    @classmethod
    def _modules_named(cls, value):
        if isinstance(value, list):
            if not value:
                raise ValueError("give at least one module name, e.g. ['q_proj', 'v_proj'], or 'all-linear'")
            blank = [v for v in value if not v.strip()]
            if blank:
                raise ValueError("module names must not be empty")
            if "all-linear" in value:
                raise ValueError("write target_modules: all-linear (a string), not inside a list")
        return value

    def canonical(self) -> dict:
        # The scale-out fields, compile, compile_memory_budget and gptq_kernel are left out at their
        # defaults, so the cache keys and checkpoints of runs made before those fields existed stay
        # valid. log_every_steps is left out always: it changes only the logs (report files), and a
        # new value must not retrain.
        # lean_activations stays in: its gradients agree with PEFT's only to rounding, its
        # dropout masks are drawn otherwise, and it changes what micro-batch 'auto' picks.
        canon = super().canonical()
        del canon["log_every_steps"]
        if self.processes == 1 and self.strategy == "single":
            del canon["processes"], canon["strategy"]
        if not self.compile:
            del canon["compile"]
        if self.compile_memory_budget == 1.0 or not self.compile:  # without compile it changes nothing
            del canon["compile_memory_budget"]
        if self.gptq_kernel == "auto":
            del canon["gptq_kernel"]
        return canon

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step over all processes (of a numeric micro_batch_size; 'auto'
        is resolved by the run)."""
        if self.micro_batch_size == "auto":
            raise ValueError("micro_batch_size is 'auto': expert.train.memory.plan_memory resolves it")
        return self.effective_batch_size // self.micro_batch_size
