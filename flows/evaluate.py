"""Evaluation only, as a Prefect flow: a model folder (+ an optional LoRA adapter) on
PubMedQA and MMLU, with the same cached stages as the pipeline.

    prefect deployment run expert-evaluate/evaluate \
        --param model=artifacts/quantize/<key> --param adapter=artifacts/select/<key>/adapter
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from expert.evaluation import EvalConfig
from expert.models import ModelConfig
from expert.pipeline_config import DataConfig
from flows.pipeline import DEFAULT_PRESET
from flows.swallowed_stops import redeliver_swallowed_stops
from tasks.data import format_mmlu, format_pubmedqa
from tasks.evaluate import evaluate
from tasks.model import import_model, model_folder


def _run_name() -> str:
    params = flow_run.parameters
    adapter = f" + {params['adapter']}" if params.get("adapter") else ""
    return f"evaluate {params.get('label') or 'model'}: {params.get('model')}{adapter}"


@flow(name="expert-evaluate", flow_run_name=_run_name, validate_parameters=True)
def evaluate_model(model: str, adapter: str | None = None, label: str = "model",
                   data: DataConfig = DEFAULT_PRESET.data, evaluation: EvalConfig = DEFAULT_PRESET.eval,
                   artifacts_dir: str = "artifacts") -> dict:
    """`model`: a model folder, or any model source the pipeline takes (embedded:, hf:, gguf:)."""
    redeliver_swallowed_stops()  # a Ctrl-C or SIGTERM (or SIGHUP) that lands in a finalizer is not lost
    ws = artifacts_dir
    # A folder is evaluated as it is (a GPTQ folder stays quantized); other sources are imported.
    base = model_folder(model, ws) if Path(model).expanduser().is_dir() else import_model(ModelConfig(source=model), ws)
    lora = model_folder(adapter, ws) if adapter else None
    pubmedqa = format_pubmedqa(data.pubmedqa, ws, model=base)
    mmlu = format_mmlu(data.mmlu, ws)
    scores = {"pubmedqa": evaluate("pubmedqa", evaluation, ws, base, pubmedqa, adapter=lora, label=label),
              "mmlu": evaluate("mmlu", evaluation, ws, base, mmlu, adapter=lora, label=label)}
    return {name: ref["path"] for name, ref in scores.items() if ref is not None}
