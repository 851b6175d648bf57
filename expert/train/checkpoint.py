"""Checkpoints that resume a run exactly: adapter, optimizer, scheduler, RNG, counters.

A checkpoint is a folder `checkpoints/step-NNNNNN/` holding
- the adapter as `PeftModel.save_pretrained` writes it (adapter_model.safetensors,
  adapter_config.json), loadable by plain `PeftModel.from_pretrained`;
- `optimizer.safetensors` (every tensor of the optimizer state) and `rng.safetensors`
  (torch CPU and CUDA generator states; of a run on several processes, each rank's, as
  `rank<N>.torch` and `rank<N>.cuda`, written by rank 0 alone);
- `trainer_state.json`: step counters, the optimizer's param groups and scalar state,
  the scheduler state, the run's log history needed for the summary;
- `checkpoint.json`, the marker, written last.
No pickles: tensors go to safetensors, everything else to JSON. The folder is written under a
temporary name and renamed into place after the marker, so a folder named step-N without a
marker is debris of a crash and is ignored (and replaced when the run gets there again).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

MARKER = "checkpoint.json"
STATE = "trainer_state.json"
OPTIMIZER = "optimizer.safetensors"
RNG = "rng.safetensors"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
_PREFIX = "step-"


def checkpoint_dir(root: Path, step: int) -> Path:
    return Path(root) / f"{_PREFIX}{step:06d}"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint under `root` whose marker exists, sorted by step."""
    found = []
    for path in Path(root).glob(f"{_PREFIX}*"):
        digits = path.name[len(_PREFIX):]
        if digits.isdigit() and (path / MARKER).is_file():
            found.append((int(digits), path))
    return sorted(found)


def save_checkpoint(root: Path, step: int, model, optimizer, scheduler, state: dict[str, Any],
                    marker: dict[str, Any], rng: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoint `step` atomically; `state` and `marker` must be JSON-ready; `rng`: the
    ranks' generator states (see `rank_rng`), else this process's."""
    final = checkpoint_dir(root, step)
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    _sort_set_fields(tmp / ADAPTER_FILES[1], model)
    tensors, opt_json = _split_optimizer(optimizer.state_dict())
    save_file(tensors, tmp / OPTIMIZER)
    save_file(rng if rng is not None else _rng_tensors(), tmp / RNG)
    full = {**state, "optimizer": opt_json, "scheduler": scheduler.state_dict()}
    (tmp / STATE).write_text(json.dumps(full, indent=1))
    (tmp / MARKER).write_text(json.dumps({**marker, "step": step}, indent=1))
    if final.exists():  # debris of a crash at this very step: no marker, so never trusted
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def _sort_set_fields(config_file: Path, model) -> None:
    """Write the set-valued fields of the adapter's config (target_modules) sorted.

    PEFT writes a set as `list(value)`, in an order that string hashing changes from process to
    process: the same adapter got another adapter_config.json, and so another content digest,
    on every run, and a rebuilt train stage looked changed to every stage after it."""
    config = getattr(model, "peft_config", {}).get("default")
    if config is None or not config_file.is_file():
        return
    data = json.loads(config_file.read_text())
    fields = [key for key, value in vars(config).items() if isinstance(value, set) and isinstance(data.get(key), list)]
    if fields:
        data.update({key: sorted(data[key]) for key in fields})
        config_file.write_text(json.dumps(data, indent=2, sort_keys=True))  # PEFT's own layout


def load_checkpoint(path: Path, model, optimizer, scheduler, rank: int = 0) -> dict[str, Any]:
    """Restore adapter weights, optimizer, scheduler and RNG (of `rank`) in place; return the trainer state."""
    from peft import set_peft_model_state_dict

    path = Path(path)
    weights = load_file(path / ADAPTER_FILES[0])
    result = set_peft_model_state_dict(model, weights)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise RuntimeError(f"checkpoint {path} holds adapter weights the model lacks: {unexpected[:5]}")
    state = json.loads((path / STATE).read_text())
    optimizer.load_state_dict(_join_optimizer(load_file(path / OPTIMIZER), state.pop("optimizer")))
    scheduler.load_state_dict(state.pop("scheduler"))
    _set_rng(load_file(path / RNG), rank)
    return state


def read_marker(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / MARKER).read_text())


def read_state(path: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint without touching any model (counters, memory plan)."""
    return json.loads((Path(path) / STATE).read_text())


def _split_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state_dict -> (tensors for safetensors, the JSON-ready rest).

    State entries may nest (bitsandbytes keeps its 8-bit buffers in a dict per parameter),
    so each leaf is stored under its path "param_index/key/subkey".
    """
    tensors, scalars = {}, {}

    def walk(path: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            # A copy: bitsandbytes shares one quantization map among parameters on the CPU,
            # and safetensors refuses tensors that share memory.
            tensors[path] = value.detach().to("cpu", copy=True).contiguous()
        elif isinstance(value, dict):
            for key, sub in value.items():
                walk(f"{path}/{key}", sub)
        else:
            scalars[path] = value  # e.g. bitsandbytes keeps `step` as an int

    for index, entries in sd["state"].items():
        walk(str(index), entries)
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for path, value in [*tensors.items(), *meta["scalars"].items()]:
        index, *keys = path.split("/")
        node = state.setdefault(int(index), {})
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _rng_tensors() -> dict[str, torch.Tensor]:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda.{i}"] = s
    return states


def rank_rng(rank: int) -> dict[str, torch.Tensor]:
    """This rank's generator states, keyed for a checkpoint of several processes. Only the rank's
    own GPU: every rank sees every GPU, and touching the others would open a context on each."""
    states = {f"rank{rank}.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states[f"rank{rank}.cuda"] = torch.cuda.get_rng_state()
    return states


def _set_rng(states: dict[str, torch.Tensor], rank: int = 0) -> None:
    if f"rank{rank}.torch" in states:
        torch.set_rng_state(states[f"rank{rank}.torch"])
        if f"rank{rank}.cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state(states[f"rank{rank}.cuda"])
        return
    torch.set_rng_state(states["torch"])
    cuda = [states[k] for k in sorted((k for k in states if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
