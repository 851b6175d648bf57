"""`expert export --merge`: the adapter folded into the base's weights, one plain transformers model.

What serving stacks without LoRA support, and conversions such as llama.cpp's to GGUF, take. Into
which weights:
- a float base (quantize.method none): its own;
- a GPTQ base: its dequantized weights, so the merged model computes what the scored expert
  computed, to float rounding (gptqmodel's torch kernel multiplies by the very same weights);
- an NF4 base: the float weights it was quantized from as it loaded, QLoRA's usual merge: it
  differs from the scored expert by NF4's rounding.

The merge streams, one tensor at a time, on the CPU: each base tensor is read (a GPTQ layer
dequantized), the adapter's B·A·scaling added in float32, the sum rounded once to `dtype` and
written straight into its shard (`expert/tensor_files.py`). So it never holds the float model:
a float base is read from its safetensors files tensor by tensor; a GPTQ base is held at its
4-bit size. PEFT's `merge_and_unload` + `save_pretrained` holds the whole model at `dtype` and
rounds twice in bf16 (the delta, then the sum); in float32 the two agree to the bit.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from expert.errors import ExpertError

SHARD_BYTES = 5 * 10**9  # save_pretrained's default max_shard_size, "5GB"
_LORA_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")
# adapter_config.json fields (PEFT 0.21) that would change what a layer computes beyond
# W + B·A·scaling, with the value under which they do not; EXPERT's train stage leaves each at
# it. (rank_pattern needs no entry: each layer's rank is read from its matrices.)
_PLAIN_LORA = {"use_dora": False, "bias": "none", "lora_bias": False, "alpha_pattern": {}, "modules_to_save": None,
               "layer_replication": None, "trainable_token_indices": None, "target_parameters": None,
               "alora_invocation_tokens": None, "use_qalora": False, "use_bdlora": None, "velora_config": None,
               "monteclora_config": None, "arrow_config": None, "kasa_config": None}


@dataclass(frozen=True)
class _Layer:
    """One adapted linear layer: its weight gains scaling · B·A."""
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scaling: float
    fan_in_fan_out: bool  # the base stores the weight [in, out] (GPT-2's Conv1D)

    @property
    def shape(self) -> tuple[int, int]:
        shape = (self.b.shape[0], self.a.shape[1])
        return shape[::-1] if self.fan_in_fan_out else shape

    def delta(self) -> torch.Tensor:
        # PEFT's get_delta_weight, in float32 and in its order of operations
        product = self.b.float() @ self.a.float()
        return (product.T if self.fan_in_fan_out else product) * self.scaling


@dataclass(frozen=True)
class _Tensor:
    """One tensor of the base, read (or dequantized) only when its turn to be written comes."""
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[], torch.Tensor]


def merged_dtype(dtype: str, weights_dir: Path) -> str:
    """`dtype` by name; "auto": the base checkpoint's own float dtype (float32 when it names none)."""
    from expert.modeling import stored_dtype

    if dtype != "auto":
        return dtype
    return str(stored_dtype(weights_dir) or torch.float32).removeprefix("torch.")


def merge_adapter(model_dir: Path, kind: str, adapter_dir: Path, out: Path, dtype: str,
                  shard_bytes: int = SHARD_BYTES) -> None:
    """Write base + adapter as one model into `out` (a transformers model folder, with its tokenizer)."""
    from expert.modeling import load_model, resolve_base, resolve_dtype

    torch_dtype = resolve_dtype(dtype, torch.device("cpu"), model_dir)  # a name: as given
    layers = read_lora(adapter_dir)
    if kind == "gptq":
        # The training load takes gptqmodel's torch kernel, whose layers dequantize as the CPU
        # training run does (expert/train/frozen.py); the model stays 4-bit in memory.
        source = Path(model_dir)
        tensors = model_tensors(load_model(source, training=True, device="cpu", dtype=dtype)[0])
    else:
        source = resolve_base(model_dir)
        tensors = checkpoint_tensors(source, layers)
        if tensors is None:  # names that transformers maps as it loads: take them from the loaded model
            tensors = model_tensors(load_model(source, device="cpu", dtype=dtype)[0])
    _check_targets(layers, tensors, source)
    out.mkdir(parents=True, exist_ok=True)
    _write_shards(tensors, layers, torch_dtype, out, shard_bytes)
    _write_config(source, out, torch_dtype)


def read_lora(adapter_dir: Path) -> dict[str, _Layer]:
    """The adapter's layers by module name, from a PEFT LoRA folder; refuses what is not plain LoRA."""
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        raise ExpertError(f"{adapter_dir} holds a {config.get('peft_type')} adapter; --merge folds LoRA adapters "
                          "only: export without --merge, as base + adapter")
    for field, plain in _PLAIN_LORA.items():
        if config.get(field, plain) not in (plain, None, {}, [], False):
            raise ExpertError(f"{adapter_dir / 'adapter_config.json'} sets {field} to {config[field]!r}, which "
                              "--merge cannot fold into plain weights: export without --merge, as base + adapter")
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in weights.items():
        found = _LORA_KEY.fullmatch(key)
        if found is None:
            raise ExpertError(f"{adapter_dir / 'adapter_model.safetensors'} holds {key}, which is no LoRA A or B "
                              "matrix; --merge folds those only: export without --merge, as base + adapter")
        pairs.setdefault(found[1], {})[found[2]] = value
    layers = {}
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise ExpertError(f"{adapter_dir} has a LoRA {''.join(pair)} matrix for {module} but not its pair: the "
                              "adapter is damaged; run the pipeline again")
        rank = pair["A"].shape[0]
        scale = math.sqrt(rank) if config.get("use_rslora") else rank
        layers[module] = _Layer(pair["A"], pair["B"], config["lora_alpha"] / scale,
                                bool(config.get("fan_in_fan_out")))
    return layers


def checkpoint_tensors(folder: Path, layers: dict[str, _Layer]) -> list[_Tensor] | None:
    """The tensors of the safetensors checkpoint in `folder`, as stored; None when there is none,
    or when an adapted layer's weight is not stored under its module's name (a checkpoint whose
    names or layout transformers converts as it loads)."""
    from expert.tensor_files import TensorReader

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = list(dict.fromkeys(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        return None
    tensors = []
    for name in files:
        reader = TensorReader(folder / name)
        tensors += [_Tensor(key, reader.shape(key), reader.dtype(key), lambda r=reader, k=key: r.read(k))
                    for key in reader.names()]
    stored = {t.name: t.shape for t in tensors}
    if any(stored.get(f"{module}.weight") != layer.shape for module, layer in layers.items()):
        return None
    return tensors


def model_tensors(model: torch.nn.Module) -> list[_Tensor]:
    """The tensors of a loaded model as transformers saves them: a GPTQ layer as the plain weight
    (and bias) it computes with, tied weights once."""
    from expert.train.frozen import dense_gptq_weight, plain_gptq_kernel

    quantized = {name: module for name, module in model.named_modules() if hasattr(module, "qweight")}
    odd = [name for name, module in quantized.items() if not plain_gptq_kernel(module)]
    if odd:
        raise ExpertError(f"--merge: the GPTQ layers {odd[:3]} do more than dequantize and multiply (an online "
                          "rotation, an EoRA adapter) or are not gptqmodel's torch kernel, so they have no plain "
                          "weights to merge into; export without --merge, as base + adapter")

    def dequantized(name: str, module: torch.nn.Module) -> torch.Tensor:
        weights = dense_gptq_weight(module)
        if weights is None:
            raise ExpertError(f"--merge: the GPTQ layer {name} is padded past its shape and could not be "
                              "dequantized to it; export without --merge, as base + adapter")
        return weights.t()  # gptqmodel multiplies x @ weights ([in, out]); a linear layer keeps [out, in]

    tensors, seen = [], set()
    for key, value in model.state_dict(keep_vars=True).items():
        module_name, _, field = key.rpartition(".")
        module = quantized.get(module_name)
        if module is None:
            if id(value) not in seen:  # a tied weight (lm_head = embeddings) is saved once
                seen.add(id(value))
                tensors.append(_Tensor(key, tuple(value.shape), value.dtype, lambda v=value: v.detach()))
        elif field == "qweight":
            tensors.append(_Tensor(f"{module_name}.weight", (module.out_features, module.in_features),
                                   module.scales.dtype, lambda n=module_name, m=module: dequantized(n, m)))
        elif field == "bias":
            tensors.append(_Tensor(key, tuple(value.shape), value.dtype, lambda v=value: v.detach()))
    return tensors


def _check_targets(layers: dict[str, _Layer], tensors: list[_Tensor], source: Path) -> None:
    shapes = {t.name: t.shape for t in tensors}
    for module, layer in layers.items():
        found = shapes.get(f"{module}.weight")
        if found != layer.shape:
            what = "has no weight" if found is None else f"has a weight of shape {list(found)}, not {list(layer.shape)},"
            raise ExpertError(f"the adapter changes {module}, for which the base {source} {what}: the adapter was "
                              "trained on another model; export the select artifact that made it")


def _write_shards(tensors: list[_Tensor], layers: dict[str, _Layer], dtype: torch.dtype, out: Path,
                  shard_bytes: int) -> None:
    from tqdm.auto import tqdm

    from expert.tensor_files import write_streamed

    def written(t: _Tensor) -> torch.dtype:
        return dtype if t.dtype.is_floating_point else t.dtype

    def size(t: _Tensor) -> int:
        return math.prod(t.shape) * torch.empty((), dtype=written(t)).element_size()

    shards: list[list[_Tensor]] = [[]]
    filled = 0
    for t in tensors:  # save_pretrained's rule: a new shard when this tensor would overflow it
        if shards[-1] and filled + size(t) > shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(t)
        filled += size(t)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])

    total = sum(map(size, tensors))
    with tqdm(total=total, unit="B", unit_scale=True, desc="merging", leave=False) as bar:
        def merged(shard: list[_Tensor]) -> Iterator[torch.Tensor]:
            for t in shard:
                value = t.read()
                layer = layers.get(t.name.removesuffix(".weight")) if t.name.endswith(".weight") else None
                # one rounding to dtype, of the float32 sum
                value = (value.float() + layer.delta()).to(dtype) if layer else value.to(written(t))
                bar.update(size(t))
                yield value

        for shard, name in zip(shards, names, strict=True):
            write_streamed(out / name, [(t.name, t.shape, written(t)) for t in shard], merged(shard))
    if len(shards) > 1:
        weight_map = {t.name: name for shard, name in zip(shards, names, strict=True) for t in shard}
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


def _write_config(source: Path, out: Path, dtype: torch.dtype) -> None:
    """The base's config without its quantization (every layer is plain now) in `dtype`, and the
    files that go with the weights: generation config, tokenizer, a model's own code."""
    from expert.hub import is_tokenizer_file

    config = json.loads((source / "config.json").read_text())
    config.pop("quantization_config", None)
    config.pop("torch_dtype", None)
    config["dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for path in sorted(source.iterdir()):
        if path.is_file() and (path.name == "generation_config.json" or is_tokenizer_file(path.name)
                               or path.suffix == ".py"):
            shutil.copyfile(path, out / path.name)
