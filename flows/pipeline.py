"""The EXPERT pipeline, as a Prefect flow: one call per stage, nothing else.

Every stage is cached by content (see tasks/stage.py): a rerun with nothing changed
executes no stage, and a change reruns only what depends on it.

    expert run configs/default.yaml --set train.learning_rate=0.0002
"""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from expert.pipeline_config import PipelineConfig
from tasks.data import format_mmlu, format_pubmedqa
from tasks.evaluate import evaluate_all
from tasks.model import import_model
from tasks.report import report
from tasks.tuning import adapter_of, quantize, select, train


def _run_name() -> str:
    config = flow_run.parameters.get("config")
    if isinstance(config, dict):
        config = PipelineConfig.model_validate(config)
    if config is None:
        return "expert"
    q = config.quantize
    quant = f"gptq{q.bits}" if q.method == "gptq" else q.method
    return (f"{config.name}: {config.model.source} {quant} LoRA r{config.train.lora_r} "
            f"lr {config.train.learning_rate:g} on pubmedqa fold {config.data.pubmedqa.fold}")


@flow(name="expert-pipeline", flow_run_name=_run_name, validate_parameters=True)
def pipeline(config: PipelineConfig = PipelineConfig()) -> dict:
    ws = config.artifacts_dir
    base = import_model(config.model, ws)
    pubmedqa = format_pubmedqa(config.data.pubmedqa, ws, model=base)
    mmlu = format_mmlu(config.data.mmlu, ws)
    quantized = quantize(config.quantize, ws, model=base, data=pubmedqa)
    checkpoints = train(config.train, ws, model=quantized, data=pubmedqa)
    selected = select(config.select, config.eval, ws, model=quantized, checkpoints=checkpoints, data=pubmedqa)
    scores = evaluate_all(config.eval, ws, base=base, quantized=quantized if config.quantize.method != "none" else None,
                          expert=adapter_of(selected), pubmedqa=pubmedqa, mmlu=mmlu)
    final = report(config, ws, parts={**scores, "import_model": base, "format_pubmedqa": pubmedqa, "format_mmlu": mmlu,
                                      "quantize": quantized, "train": checkpoints, "select": selected})
    return {"report": final["path"], "expert": {"model": quantized["path"], "adapter": adapter_of(selected)["path"]}}
