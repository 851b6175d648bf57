"""The whole pipeline's config: one section per stage, loaded from a YAML preset.

`load_config("configs/default.yaml", ["data.pubmedqa.fold=3"])` reads the preset, applies
`--set` overrides (values parsed as YAML, so `3`, `true`, `null`, `[a, b]` work) and
validates everything at once, naming each bad field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field

from expert.benchmarks.mmlu import MMLUConfig
from expert.benchmarks.pubmedqa import PubMedQAConfig
from expert.config import StageConfig
from expert.errors import ConfigError
from expert.evaluation import EvalConfig
from expert.models import ModelConfig
from expert.quantize import QuantizeConfig
from expert.select import SelectConfig
from expert.train import TrainConfig


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


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist; presets live in configs/ (e.g. configs/default.yaml)")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    return PipelineConfig.from_dict(raw, where=str(path) if path else "")


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
