"""Stages that bring inputs in: the base model and the benchmark data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from expert.stages.base import Stage


@dataclass(frozen=True)
class ImportModel(Stage):
    name: ClassVar[str] = "import_model"
    version: ClassVar[int] = 1
    fingerprinted_fields: ClassVar[tuple[str, ...]] = ("source", "revision")

    def fetch(self, config, workspace):
        from expert.models import resolve_model_source

        resolved = resolve_model_source(config, cache_dir=workspace.downloads / "models",
                                        fingerprints=workspace.fingerprints)
        return {"source": resolved}

    def produce(self, config, upstream, inputs, out, progress=None, work_dir=None):
        from expert.models import import_model

        return import_model(config, inputs["source"], out)


@dataclass(frozen=True)
class FormatPubMedQA(Stage):
    name: ClassVar[str] = "format_pubmedqa"
    # 2: max_prompt_tokens cuts train prompts only (dev and test keep the full abstract, as the
    # published results score it); the full PQA-L's test split is checked against the official one
    version: ClassVar[int] = 2
    fingerprinted_fields: ClassVar[tuple[str, ...]] = ("source", "extra_train_source")

    def fetch(self, config, workspace):
        from expert.sources import fetch

        inputs = {"source": fetch(config.source, workspace.downloads, workspace.fingerprints)}
        if config.extra_train_source:
            inputs["extra_train"] = fetch(config.extra_train_source, workspace.downloads, workspace.fingerprints)
        return inputs

    def produce(self, config, upstream, inputs, out, progress=None, work_dir=None):
        from expert.benchmarks.pubmedqa import format_pubmedqa

        tokenizer = None
        if config.max_prompt_tokens:  # the train split's budget is in tokens of the model being tuned
            from expert.modeling import load_tokenizer

            tokenizer = load_tokenizer(upstream["model"])
        extra = inputs.get("extra_train")
        return format_pubmedqa(config, inputs["source"].path, out, tokenizer=tokenizer,
                               extra_source=extra.path if extra else None)


@dataclass(frozen=True)
class FormatMMLU(Stage):
    name: ClassVar[str] = "format_mmlu"
    version: ClassVar[int] = 1
    fingerprinted_fields: ClassVar[tuple[str, ...]] = ("source",)

    def fetch(self, config, workspace):
        from expert.sources import fetch

        return {"source": fetch(config.source, workspace.downloads, workspace.fingerprints)}

    def produce(self, config, upstream, inputs, out, progress=None, work_dir=None):
        from expert.benchmarks.mmlu import format_mmlu

        return format_mmlu(config, inputs["source"].path, out)
