"""Checkpoints that resume a run exactly: adapter, optimizer, scheduler, RNG, counters.

A checkpoint is a folder `checkpoints/step-NNNNNN/` holding
- the adapter as `PeftModel.save_pretrained` writes it (adapter_model.safetensors,
  adapter_config.json), loadable by plain `PeftModel.from_pretrained`;
- `optimizer.safetensors` (every tensor of the optimizer state) and `rng.safetensors`
  (torch CPU and CUDA generator states; of a run on several processes, each rank's, as
  `rank<N>.torch` and `rank<N>.cuda`, written by rank 0 alone);
- `trainer_state.json`: step counters, the optimizer's param groups and scalar state,
  the scheduler state, the run's log history needed for the summary;
- `checkpoint.json`, the marker, written last, with the size and sha256 of every file above
  but trainer_state.json (which holds timings: its digest would make the marker differ
  between two builds of the same adapter).
No pickles: tensors go to safetensors, everything else to JSON. The folder is written under a
temporary name, every file and the folder are fsynced, and it is renamed into place after the
marker, so a folder named step-N without a marker is debris of a crash and is ignored (and
replaced when the run gets there again). `verify_checkpoint` checks a folder against its
marker; one that fails is moved aside (`set_aside`) by the run that finds it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from expert.artifacts import file_digest

MARKER = "checkpoint.json"
STATE = "trainer_state.json"
OPTIMIZER = "optimizer.safetensors"
RNG = "rng.safetensors"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
# The files whose size and digest the marker records. For LoRA they are small: the 33B preset's
# adapter is 49 MiB and its 8-bit optimizer state ~25 MiB, the 8B preset's 160 and 320 MiB
# (float32 AdamW), so at sha256's ~1 GB/s a checkpoint costs at most half a second more to write
# and to check on resume; the presets checkpoint every 10 optimizer steps of 50 examples.
RECORDED_FILES = (*ADAPTER_FILES, OPTIMIZER, RNG)
_PREFIX = "step-"
BAD_PREFIX = ".bad-"


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
    # No embedding weights: training never resizes the vocabulary. PEFT's "auto" finds that out by
    # looking the base up by its name, and a base named by its place in the store ("quantize/KEY",
    # see expert.train.loop) is no local path: PEFT would ask the Hugging Face Hub, at every checkpoint.
    model.save_pretrained(tmp, save_embedding_layers=False)
    _sort_set_fields(tmp / ADAPTER_FILES[1], model)
    tensors, opt_json = _split_optimizer(optimizer.state_dict())
    save_file(tensors, tmp / OPTIMIZER)
    save_file(rng if rng is not None else _rng_tensors(), tmp / RNG)
    full = {**state, "optimizer": opt_json, "scheduler": scheduler.state_dict()}
    (tmp / STATE).write_text(json.dumps(full, indent=1))
    files = {name: _describe(tmp / name) for name in RECORDED_FILES}
    (tmp / MARKER).write_text(json.dumps({**marker, "step": step, "files": files}, indent=1))
    # Without these a power loss can keep the rename and the marker but lose the tensors'
    # contents (XFS; ext4 renaming a folder of new files): a complete-looking empty checkpoint.
    _fsync_folder(tmp)
    if final.exists():  # debris of a crash at this very step: no marker, so never trusted
        shutil.rmtree(final)
    tmp.rename(final)
    _fsync_dir(final.parent)
    return final


def verify_checkpoint(path: Path) -> str | None:
    """None if checkpoint folder `path` can be resumed from, else what is wrong with it.

    Files the marker records must have its size and sha256; a marker of an older version
    records none, so its tensors are read in full instead. The trainer state must parse.
    """
    path = Path(path)
    try:
        marker = read_marker(path)
        recorded = marker.get("files")
        if recorded:
            for name, expected in recorded.items():
                problem = _check_file(path / name, expected)
                if problem:
                    return problem
        else:
            for name in (ADAPTER_FILES[0], OPTIMIZER, RNG):
                load_file(path / name)
            json.loads((path / ADAPTER_FILES[1]).read_text())
        json.loads((path / STATE).read_text())
    except Exception as exc:  # safetensors, JSON, OS errors...: whatever fails to read, do not resume from it
        return f"{type(exc).__name__}: {exc}"
    return None


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint to `.bad-step-N` beside it, so no later run tries it again
    (and nothing copies it into the outputs); an earlier one of that name is replaced."""
    path = Path(path)
    target = path.with_name(BAD_PREFIX + path.name)
    if target.exists():
        shutil.rmtree(target)
    path.rename(target)
    return target


def _describe(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": file_digest(path)}


def _check_file(path: Path, expected: dict[str, Any]) -> str | None:
    if not path.is_file():
        return f"{path.name} is missing"
    size = path.stat().st_size
    if size != expected.get("size"):
        return f"{path.name} has {size} bytes, the marker says {expected.get('size')}"
    if "sha256" in expected and file_digest(path) != expected["sha256"]:
        return f"{path.name} differs from the marker's sha256"
    return None


def _fsync_folder(folder: Path) -> None:
    """Every file in the folder (and below), then the folders themselves."""
    for path in sorted(folder.rglob("*"), reverse=True):  # a folder after what it holds
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        elif path.is_dir():
            _fsync_dir(path)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    """Make the folder's entries (new names, a rename into it) durable."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open a folder; its renames need no folder fsync
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
