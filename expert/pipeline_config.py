"""The whole pipeline's config: one section per stage, loaded from a YAML preset.

`load_config("configs/default.yaml", ["data.pubmedqa.fold=3"])` reads the preset, applies
`--set` overrides (values parsed as YAML, so `3`, `true`, `null`, `[a, b]` work) and
validates everything at once, naming each bad field.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import Field, model_validator

from expert.benchmarks.mmlu import MMLUConfig
from expert.benchmarks.pubmedqa import PubMedQAConfig
from expert.config import StageConfig
from expert.errors import ConfigError, did_you_mean
from expert.evaluation import EvalConfig
from expert.models import ModelConfig
from expert.quantize import QuantizeConfig
from expert.select import SelectConfig
from expert.train import TrainConfig
from expert.train.config import FSDP_GPTQ


# The stages in pipeline order; `--force STAGE` (and the flow's `force` parameter) recompute
# the named stages and everything downstream of them.
StageName = Literal["import_model", "format_pubmedqa", "format_mmlu", "quantize", "train", "select",
                    "evaluate", "report"]
STAGE_NAMES: tuple[str, ...] = get_args(StageName)


def _presets_dir() -> Path:
    """Shipped presets live beside the code (configs/), so a notebook finds them from anywhere. A
    regular (not editable) install, as in the Docker image, puts the code in site-packages without
    them: then they are the working directory's, the project folder a deployment runs in."""
    beside = Path(__file__).resolve().parents[1] / "configs"
    return beside if beside.is_dir() else Path.cwd() / "configs"


PRESETS_DIR = _presets_dir()


class DataConfig(StageConfig):
    pubmedqa: PubMedQAConfig = Field(default_factory=PubMedQAConfig)
    mmlu: MMLUConfig | None = Field(default_factory=MMLUConfig, description="null skips MMLU")


class PipelineConfig(StageConfig):
    name: str = Field("expert", description="shown in the flow run's name")
    artifacts_dir: str = Field("artifacts", description="root of the artifact store (not part of any key)")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _train_strategy_fits_quantization(self) -> PipelineConfig:
        # Said here, before any stage runs, rather than when the train stage finds the GPTQ folder.
        # A ConfigError, not a ValueError: pydantic would append the whole config as the "input".
        if self.train.strategy == "fsdp" and self.quantize.method == "gptq":
            raise ConfigError(f"'train.strategy' is fsdp and 'quantize.method' is gptq: {FSDP_GPTQ}")
        return self


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist; presets live in configs/ (e.g. configs/default.yaml)")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from None
        if raw is None:  # the built-in defaults are GPU-sized (10 epochs, full MMLU): never by accident
            raise ConfigError(f"config file '{path}' is empty; start from a preset in configs/ "
                              "(e.g. a copy of configs/default.yaml)")
        if not isinstance(raw, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    return PipelineConfig.from_dict(raw, source=str(path) if path else "")


def sections_left_out(config: PipelineConfig) -> list[str]:
    """Sections the config does not give, which take PipelineConfig's built-in defaults."""
    return [name for name in type(config).model_fields if name not in config.model_fields_set]


def warn_sections_left_out(config: PipelineConfig) -> None:
    """A deployment run's `config` replaces the whole preset (Prefect merges parameters one level
    deep): `--param config='{"train": {...}}'` keeps nothing of the preset, and the sections left
    out take the built-in defaults, sized for a GPU (10 epochs, the full MMLU). Said at the start."""
    missing = sections_left_out(config)
    if missing:
        logging.getLogger(__name__).warning(
            "the config leaves out %s: %s take%s the built-in defaults (sized for a GPU: 10 epochs, the full "
            "MMLU), not a preset's. To change a few fields of a preset, pass all of it: "
            "--params \"$(expert params configs/default.yaml --set train.learning_rate=...)\"",
            ", ".join(missing), "they" if len(missing) > 1 else "it", "" if len(missing) > 1 else "s")


def check_local_sources(config: PipelineConfig) -> None:
    """Every input given as a local path exists: said at the start, naming the field, rather than
    when its stage is reached (after a model download, say). URLs and hub names are fetched later."""
    sources = {"model.source": config.model.source,
               "data.pubmedqa.source": config.data.pubmedqa.source,
               "data.pubmedqa.extra_train_source": config.data.pubmedqa.extra_train_source,
               "data.mmlu.source": config.data.mmlu.source if config.data.mmlu else None}
    if config.quantize.method == "gptq" and config.quantize.calibration != "task":
        sources["quantize.calibration"] = config.quantize.calibration
    for field, source in sources.items():
        if not source or source.startswith(("http://", "https://", "hf:", "embedded:")):
            continue
        path = Path(source.removeprefix("gguf:")).expanduser()
        if path.exists():
            continue
        if field == "model.source":
            instead = "a local Hugging Face folder, gguf:FILE, hf:ORG/NAME or embedded:NAME" + (
                f" (a hub model is written hf:{source})" if source.count("/") == 1 else "")
        else:
            instead = "an http(s) URL or hf:ORG/NAME" if field.startswith("data.") else "'task'"
        raise ConfigError(f"{field} '{source}' does not exist (resolved to {path.resolve()}); fix the path, "
                          f"or give {instead}")


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one `dotted.key=value` override to the raw config mapping, in place."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{item}' must look like section.field=value (e.g. data.pubmedqa.fold=3)")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override '{item}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def load_preset(name: str = "default", overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """A shipped preset by name (configs/NAME.yaml), e.g. `load_preset("gpu-8b")`."""
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
        raise ConfigError(f"no preset '{name}' in {PRESETS_DIR}; known presets: {', '.join(known) or 'none'}")
    return load_config(path, overrides)


def check_stage_names(names: list[str] | tuple[str, ...]) -> list[str]:
    """Validate `--force` stage names, with a "did you mean" for a typo."""
    for name in names:
        if name not in STAGE_NAMES:
            raise ConfigError(f"unknown stage '{name}' for --force{did_you_mean(name, STAGE_NAMES)}; "
                              f"stages, in order: {', '.join(STAGE_NAMES)}")
    return list(names)
