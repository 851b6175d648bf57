"""Prefect tasks: format PubMedQA and MMLU to Parquet."""

from __future__ import annotations

from expert.benchmarks.mmlu import MMLUConfig
from expert.benchmarks.pubmedqa import PubMedQAConfig
from expert.stages import FormatMMLU, FormatPubMedQA
from tasks.stage import run_stage


def format_pubmedqa(config: PubMedQAConfig, workspace: str, model: dict | None = None,
                    force: bool = False) -> dict[str, str]:
    # The model's tokenizer matters only when prompts are truncated to a token budget;
    # otherwise a new model must not reformat the data.
    upstream = {"model": model} if config.max_prompt_tokens else {}
    return run_stage(FormatPubMedQA(), config, workspace, upstream=upstream, force=force,
                     label=f"format pubmedqa fold {config.fold}")


def format_mmlu(config: MMLUConfig | None, workspace: str, force: bool = False) -> dict[str, str] | None:
    if config is None:
        return None
    return run_stage(FormatMMLU(), config, workspace, force=force, label="format mmlu")
