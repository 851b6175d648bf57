"""The one model loader every stage uses (quantize, train, select, evaluate).

A model folder is one of
  - a plain Hugging Face folder (config.json, *.safetensors, tokenizer files);
  - a GPTQ folder: the same, with `quantization_config` in config.json (written by the
    quantize stage through transformers + optimum + gptqmodel);
  - a quantize-stage record: `quantization.json` and no weights. `{"method": "nf4"}` loads the
    base it names with bitsandbytes 4-bit NF4 (double quant, QLoRA-style) at load time;
    `{"method": "none"}` loads the base as is.

    model, tokenizer = load_model(Path("artifacts/quantize/<key>"), training=True)

`training=True` applies the settings without which LoRA silently gets no gradient on a CPU:
  1. gptqmodel's default CPU kernel (TorchAtenLinear) decides its mode on its first forward:
     a first forward in eval mode under no_grad repacks the weights for an int4 ATen kernel that
     runs under `torch.no_grad`, for good. Nothing upstream of it then gets a gradient, and
     switching the mode back afterwards reads the repacked weights wrongly. For training we
     load gptqmodel's plain torch kernel (no such latch) and pin `linear_mode = "train"` on any
     module that still has the latch, before any forward runs.
  2. bitsandbytes `Linear4bit`, on CPUs with AVX512-BF16, repacks its weight into an
     inference-only layout on the first eval forward under no_grad; later training forwards
     give no gradient. We switch that repacking off for nf4 models, always (see `_nf4_safe`).

GPTQ inference on a Hopper GPU without the CUTLASS sources that gptqmodel's Machete kernel is
built from takes the next kernel instead of failing the load, and a GPTQ kernel the user names
(`gptq_kernel`) is checked before the load (see `expert.gptq_kernel`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from expert.artifacts import file_digest
from expert.errors import ConfigError, ModelError
from expert.gptq_kernel import aten_int4_fits, chosen_backend, inference_backend, training_backend

log = logging.getLogger(__name__)

RECORD_FILE = "quantization.json"  # written by the quantize stage for nf4 / none
# Written by the import stage beside a model's own Python code when model.trust_remote_code
# was on: the consent, given once at import, that later stages may run that code.
CODE_CONSENT_FILE = "remote_code.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_record(model_dir: Path) -> dict[str, Any] | None:
    """The quantize stage's `quantization.json` of `model_dir`, or None for a weights folder."""
    path = Path(model_dir) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path} is not valid JSON ({exc}); rerun the quantize stage") from None
    if record.get("method") not in ("nf4", "none") or not isinstance(record.get("base_model"), str):
        raise ModelError(f"{path} must hold 'method' (nf4 or none) and 'base_model' (a path relative "
                         f"to its folder); got {record!r}. Rerun the quantize stage")
    return record


def resolve_base(model_dir: Path) -> Path:
    """Follow `quantization.json` to the folder holding the real weights, else `model_dir`."""
    model_dir = Path(model_dir)
    record = read_record(model_dir)
    if record is None:
        return model_dir
    base = (model_dir / record["base_model"]).resolve()
    if not (base / "config.json").is_file():
        raise ModelError(f"{model_dir / RECORD_FILE} points at base model {base}, which has no "
                         "config.json; the base artifact was moved or deleted: rerun the import stage")
    return base


def model_kind(model_dir: Path) -> str:
    """'nf4', 'none', 'gptq' or 'plain' (a quantization_config of another method counts as plain:
    transformers loads it by itself)."""
    record = read_record(model_dir)
    if record is not None:
        return record["method"]
    quant = _config_json(model_dir).get("quantization_config") or {}
    return "gptq" if quant.get("quant_method") == "gptq" else "plain"


GPTQ_CONFIG_MERGED = ("You passed `quantization_config` or equivalent parameters to `from_pretrained` but the "
                      "model you're loading already has a `quantization_config` attribute")
CHECKPOINTING_ALIAS = "`is_gradient_checkpointing` is deprecated"


@contextlib.contextmanager
def known_warnings_muted():
    """Mutes two library warnings every stage printed that say nothing about the run (any other
    warning still shows): transformers' "the `quantization_config` from the model will be used"
    on a GPTQ load, which passes only loading options (the kernel) that transformers merges into
    the stored config, as meant, though the words read as if they were ignored; and the
    deprecation of `is_gradient_checkpointing`, an alias PEFT reads when it wraps a model.

    Muted around the calls, not at import: warning filters set while pytest collects (or under
    any caller's `catch_warnings`) are gone once that block ends."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=GPTQ_CONFIG_MERGED, category=UserWarning)
        warnings.filterwarnings("ignore", message=CHECKPOINTING_ALIAS, category=FutureWarning)
        yield


def load_model(model_dir: Path, *, adapter_dir: Path | None = None, training: bool = False,
               device: str = "auto", dtype: str = "auto", shardable: bool = False,
               gptq_kernel: str = "auto") -> tuple[Any, Any]:
    """Load (model, tokenizer) from any model folder of the pipeline; see the module docstring.

    device: "auto" (CUDA if visible, else CPU), "cpu" or "cuda[:N]". dtype: "auto" (float32 on
    the CPU; on a GPU the checkpoint's 16-bit dtype, else bfloat16) or a torch dtype name.
    The model is returned in eval mode; the caller switches to train mode when it trains.
    shardable: store nf4 weights as the compute dtype (`bnb_4bit_quant_storage`), not uint8, so
    that FSDP can shard them (training with strategy fsdp); the numbers are the same.
    gptq_kernel: gptqmodel's kernel for a GPTQ model, as train.gptq_kernel (training) or
    eval.gptq_kernel names it; "auto" lets EXPERT and gptqmodel choose. Other models ignore it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    kind = model_kind(model_dir)
    base = resolve_base(model_dir)
    check_model_dir(base)
    if adapter_dir is not None:
        check_adapter_dir(Path(adapter_dir))
    torch_device = resolve_device(device)
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype, torch_device, base),
                              "device_map": {"": torch_device}}
    dense_cache = False
    if kind == "gptq":
        # The dense copy is the torch kernel's weight cache: with another kernel named, none.
        dense_cache = (not training and gptq_kernel in ("auto", "torch")
                       and _gptq_dense_cache_fits(base, torch_device, kwargs["dtype"]))
        kwargs["quantization_config"] = _gptq_loading_config(base, torch_device, kwargs["dtype"], training,
                                                             dense_cache, gptq_kernel)
    elif kind == "nf4":
        kwargs["quantization_config"] = _nf4_config(kwargs["dtype"], shardable)
    trusted = remote_code_trusted(base)
    try:
        with (_eager_gptq_dequant(kind == "gptq" and torch_device.type == "cpu"), _gptq_weight_cache(dense_cache),
              known_warnings_muted()):
            model = AutoModelForCausalLM.from_pretrained(base, trust_remote_code=trusted, **kwargs)
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        raise ModelError(
            f"the model in {base} needs its own Python code, and no consent to run it was recorded there "
            f"({CODE_CONSENT_FILE}, written by the import stage when model.trust_remote_code is true). If you "
            "trust the model, set model.trust_remote_code: true; an import made before EXPERT recorded the "
            "consent must be redone: delete its artifacts/import_model/<key> folder and run again") from None
    if kind == "gptq" and training:
        _pin_gptq_train_mode(model)
    if kind == "nf4":
        _nf4_safe(model)
    if adapter_dir is not None:
        model = _attach_adapter(model, Path(adapter_dir), training)
    model.eval()
    return model, AutoTokenizer.from_pretrained(base, trust_remote_code=trusted)


def load_tokenizer(model_dir: Path):
    """The tokenizer of a model folder of the pipeline (its own code runs only as `load_model`'s)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=remote_code_trusted(Path(model_dir)))


def write_code_consent(folder: Path, code_files: list[str]) -> None:
    """Record that the user let `code_files` (in `folder`) run: model.trust_remote_code was on."""
    files = {name: file_digest(Path(folder) / name) for name in sorted(code_files)}
    (Path(folder) / CODE_CONSENT_FILE).write_text(json.dumps({"trust_remote_code": True, "files": files},
                                                             indent=2))


def carry_code_consent(source: Path, target: Path) -> None:
    """Keep the consent for a model saved from a trusted one (the GPTQ stage's output), provided
    the saved code is the code the consent names."""
    if not remote_code_trusted(source):
        return
    recorded = json.loads((Path(source) / CODE_CONSENT_FILE).read_text())["files"]
    saved = {p.name: file_digest(p) for p in Path(target).glob("*.py")}
    if saved != recorded:
        raise ModelError(f"the model code saved into {target} ({', '.join(sorted(saved)) or 'none'}) is not the "
                         f"code imported with model.trust_remote_code ({', '.join(sorted(recorded))})")
    write_code_consent(target, list(saved))


def remote_code_trusted(folder: Path) -> bool:
    """Whether transformers may run the Python code in `folder`.

    Only where the import stage wrote its consent record, and only the code it recorded: a .py
    file changed or added since then is refused, as is any folder without the record (a model's
    code never runs because a folder happens to hold some).
    """
    path = Path(folder) / CODE_CONSENT_FILE
    if not path.is_file():
        return False
    try:
        recorded = json.loads(path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{path} is unreadable ({exc}); rerun the import stage") from None
    present = {p.name for p in Path(folder).glob("*.py")}
    changed = sorted(name for name in present | set(recorded)
                     if name not in recorded or name not in present
                     or file_digest(Path(folder) / name) != recorded[name])
    if changed:
        raise ModelError(f"the model code in {folder} differs from what was imported with "
                         f"model.trust_remote_code ({', '.join(changed)}); it is not run. Rerun the import stage")
    return True


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device: unknown device {device!r}; use 'auto', 'cpu' or 'cuda[:N]'") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device is {device!r} but no CUDA GPU is visible; use 'cpu' or 'auto'")
    return resolved


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX). On one that
    does (an AMD EPYC with AVX512-BF16, 2 threads) a SmolLM2-sized matmul ran at 830 GFLOP/s in
    bf16 against 209 in float32, and a training step took half the time; without, torch emulates
    bf16 and it is slower than float32."""
    try:
        with open(cpuinfo) as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:  # not Linux: no way to tell here, so no
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def gpu_has_bf16() -> bool:
    """Ampere and newer; older cards emulate bf16 slowly (and fp16 autocast would need loss scaling)."""
    try:
        return torch.cuda.is_bf16_supported()
    except (RuntimeError, AssertionError):  # no usable CUDA
        return False


def resolve_dtype(dtype: str, device: torch.device, model_dir: Path) -> torch.dtype:
    """float32 on the CPU for 'auto' (CPU half-precision matmuls are slow or missing); on a GPU the
    checkpoint's 16-bit dtype, else bfloat16."""
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ConfigError(f"dtype: unknown {dtype!r}; use 'auto' or one of {', '.join(_DTYPES)}")
        return _DTYPES[dtype]
    if device.type == "cpu":
        return torch.float32
    stored = stored_dtype(model_dir)
    return stored if stored in (torch.bfloat16, torch.float16) else torch.bfloat16


def stored_dtype(model_dir: Path) -> torch.dtype | None:
    """The float dtype config.json says the checkpoint holds, None when it names none we load."""
    config = _config_json(model_dir)
    return _DTYPES.get(config.get("dtype") or config.get("torch_dtype"))


def check_model_dir(model_dir: Path) -> None:
    """Raise ModelError naming what a Hugging Face model folder lacks."""
    if not model_dir.is_dir():
        raise ModelError(f"model folder {model_dir} does not exist; run the import stage first "
                         "(`expert import`) or point at a Hugging Face model folder")
    missing = [] if (model_dir / "config.json").is_file() else ["config.json"]
    if not any((model_dir / name).is_file() for name in _TOKENIZER_FILES):
        missing.append("a tokenizer (one of " + ", ".join(_TOKENIZER_FILES) + ")")
    if not list(model_dir.glob("*.safetensors")) and not list(model_dir.glob("*.bin")):
        missing.append("weights (*.safetensors or *.bin)")
    if missing:
        raise ModelError(f"model folder {model_dir} lacks {'; '.join(missing)}; it should be "
                         "written by `save_pretrained` of both the model and its tokenizer")


def _config_json(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        check_model_dir(Path(model_dir))  # raises, saying how to get the folder
    if not path.is_file():
        raise ModelError(f"model folder {model_dir} has neither config.json nor {RECORD_FILE}; "
                         "point at an imported or quantized model folder")
    return json.loads(path.read_text())


def _gptq_loading_config(model_dir: Path, device: torch.device, dtype: torch.dtype, training: bool,
                         dense_cache: bool = False, kernel: str = "auto"):
    """A GPTQConfig carrying only loading options: transformers merges them into the stored config.

    For training, gptqmodel's plain torch kernel on the CPU (TorchAtenLinear, picked by "auto",
    latches into inference mode, see the module docstring; "auto_trainable" still picks it), and
    on a GPU the trainable kernel gptqmodel's "auto_trainable" would pick, named, so that the
    kernels it would pass over are not built (`expert.gptq_kernel.training_backend`). For
    inference, gptqmodel's fastest kernel ("auto"), except on a CPU scoring in bf16 where the
    dequantized weights fit (`_gptq_dense_cache_fits`), on a CPU scoring in another dtype (below),
    and on a Hopper GPU without Machete's sources (`expert.gptq_kernel`). A kernel the user named
    (`kernel` other than "auto") is taken as named, once gptqmodel accepts it here.
    """
    from transformers import GPTQConfig

    stored = _config_json(model_dir)["quantization_config"]
    backend = "auto"
    if kernel != "auto":
        backend = chosen_backend(kernel, stored, device, training,
                                 "train.gptq_kernel" if training else "eval.gptq_kernel")
    elif training or dense_cache:
        backend = "gptq_torch" if device.type == "cpu" else training_backend(stored, device)
    elif device.type == "cpu" and (dtype != torch.bfloat16 or not aten_int4_fits(stored)):
        # "auto" picks the int4 ATen kernel for any 4-bit model. It fails on the first forward
        # for group sizes it lacks, and it multiplies in bf16 whatever dtype it is given: scoring
        # the 4-bit SmolLM2 "in float32" with it moved logits by up to 1.0 from the float32 sums
        # of the very same weights (bf16 itself: 3.8). A float32 evaluation computes in float32
        # with the plain torch kernel, the weights training used, and ran faster on a Xeon too
        # (1.97 against 1.21 questions/s, bench/results/gptq_kernels_cpu.json).
        backend = "gptq_torch"
    else:
        backend = inference_backend(stored, device, dtype)
    return GPTQConfig(bits=stored["bits"], backend=backend)


def _gptq_dense_cache_fits(model_dir: Path, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether CPU scoring should keep each GPTQ layer's weights dequantized, once, in `dtype`.

    gptqmodel's int4 CPU kernel (TorchAtenLinear) unpacks the weights on every call and permutes
    the input first. Its plain torch kernel can instead keep the dequantized weights of its first
    forward (gptqmodel's GPTQ_TORCH_CACHE_WEIGHTS) and multiply densely after that: the same
    weights, the same model. On a CPU with native bf16 matmuls (AMD EPYC, AVX512-BF16, 2 threads)
    the 4-bit SmolLM2 scored PubMedQA's 500 test questions at 5.8 questions/s this way against
    3.2 with the int4 kernel (3 answers of 500 changed: bf16 rounds the two kernels' sums
    differently). In float32 the plain torch kernel dequantizes on each call (the int4 kernel,
    faster on that EPYC at 3.3 against 2.3 questions/s, computes in bf16: see
    `_gptq_loading_config`), and the copy costs 16 bits per weight in host memory: only in bf16,
    and only while the copy takes at most half the memory available (each process checks for
    itself: concurrent loads on one host, e.g. local dask workers, could together take more).
    """
    if device.type != "cpu" or dtype != torch.bfloat16:  # float16: CPUs emulate it, unmeasured
        return False
    dense = _gptq_dense_bytes(model_dir)
    return dense is not None and dense <= available_memory() // 2


def _gptq_dense_bytes(model_dir: Path) -> int | None:
    """Bytes of every GPTQ layer's weights dequantized to 16 bits, from the checkpoint's headers."""
    from safetensors import safe_open

    bits = _config_json(model_dir)["quantization_config"].get("bits", 4)
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files or 32 % bits:  # 3-bit packing spans words; no dense estimate needed to stay safe
        return None
    total = 0
    for path in files:
        with safe_open(str(path), framework="pt") as tensors:
            for name in tensors.keys():
                if name.endswith(".qweight"):
                    packed_rows, columns = tensors.get_slice(name).get_shape()
                    total += packed_rows * (32 // bits) * columns * 2
    return total


def available_memory(meminfo: str = "/proc/meminfo") -> int:
    """MemAvailable in bytes; 0 where it cannot be read (then nothing extra is kept)."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


@contextlib.contextmanager
def _gptq_weight_cache(active: bool):
    """gptqmodel's torch kernel reads GPTQ_TORCH_CACHE_WEIGHTS when each layer is built: set it
    for this load only, so that training loads (whose weights must not be cached) are unaffected."""
    if not active:
        yield
        return
    before = os.environ.get("GPTQ_TORCH_CACHE_WEIGHTS")
    os.environ["GPTQ_TORCH_CACHE_WEIGHTS"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("GPTQ_TORCH_CACHE_WEIGHTS", None)
        else:
            os.environ["GPTQ_TORCH_CACHE_WEIGHTS"] = before


@contextlib.contextmanager
def _eager_gptq_dequant(active: bool):
    """While active, gptqmodel's torch kernel (TorchLinear, the CPU's training kernel) does not
    torch.compile its dequantization at load, as it does by default for every layer.

    On the CPU that compile bought nothing and cost time. Measured on the default pipeline's
    4-bit SmolLM2, 2 threads, one forward + backward of 8 x 300 tokens:
      - steady state: 9.1 s compiled against 9.0 s eager;
      - extra cost: 2 s on the first step, and ~6 s on the second eval forward;
      - the default train stage: 71.6 s with it, 61.2 s without, the same losses.
    The eval path guards on each layer's data pointers, so it recompiles layer after layer, up to
    gptqmodel's limit of 128. GPUs keep gptqmodel's default: unmeasured there.
    """
    kernel = None
    if active:
        try:
            from gptqmodel.nn_modules.qlinear.torch import TorchLinear as kernel
        except ImportError:  # another gptqmodel layout: leave it as it comes
            kernel = None
    if kernel is None or "optimize" not in vars(kernel):
        yield
        return
    compiling = kernel.optimize

    def eager(self, *args, **kwargs):
        self.optimized = True  # what the base class's optimize records, without the compile

    kernel.optimize = eager
    try:
        yield
    finally:
        kernel.optimize = compiling


def _pin_gptq_train_mode(model: torch.nn.Module) -> None:
    """Fix the forward mode of latching gptqmodel kernels to "train" before any forward runs."""
    for module in model.modules():
        if hasattr(module, "linear_mode") and getattr(module, "qweight", None) is not None:
            if module.linear_mode not in (None, "train"):
                raise ModelError("a quantized layer already ran an inference forward; load the model "
                                 "with training=True before running it")
            module.linear_mode = "train"


def _nf4_config(compute_dtype: torch.dtype, shardable: bool = False):
    from transformers import BitsAndBytesConfig

    # FSDP shards parameters of one floating dtype; packed uint8 weights mixed with the rest
    # cannot go into its flat buffers, the same bytes stored as the compute dtype can.
    storage = {"bnb_4bit_quant_storage": compute_dtype} if shardable else {}
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, **storage)


def _nf4_safe(model: torch.nn.Module) -> None:
    """Keep bitsandbytes 4-bit layers in their trainable layout, for training and inference alike.

    Why always, not only with training=True: an nf4 model is quantized afresh at each load, so
    the weights every stage sees are whatever this layout gives; the AVX512-BF16 repack computes
    in bfloat16, so scoring (select, evaluate) would see a numerically different model from the
    one training saw, and a process that scores, then trains (dev loss between steps) would stop
    getting gradients. The repack is an inference speed-up only; on a GPU the flag is unused.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def check_adapter_dir(adapter_dir: Path) -> None:
    """A LoRA adapter folder as PEFT saves it, checked before any model is loaded."""
    if not adapter_dir.is_dir():
        raise ModelError(f"adapter folder {adapter_dir} does not exist; point at the folder written by the train "
                         "stage (PeftModel.save_pretrained), e.g. artifacts/select/KEY/adapter")
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelError(f"adapter folder {adapter_dir} lacks adapter_config.json; point at the "
                         "folder written by the train stage (PeftModel.save_pretrained)")
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        # peft would fall back to adapter_model.bin, a pickle: adapters load from safetensors only.
        raise ModelError(f"adapter folder {adapter_dir} has no adapter_model.safetensors; adapters are loaded "
                         "from safetensors only (save them with PeftModel.save_pretrained, the default format)")


def _attach_adapter(model: torch.nn.Module, adapter_dir: Path, training: bool) -> torch.nn.Module:
    from peft import PeftModel

    with known_warnings_muted():
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=training)
