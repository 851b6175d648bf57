"""The EXPERT pipeline, as a Prefect flow: one call per stage, nothing else.

Every stage is cached by content (see tasks/stage.py): a rerun with nothing changed
executes no stage, and a change reruns only what depends on it. `force` names stages to
recompute anyway, with everything downstream of them.

    expert run configs/default.yaml --set train.learning_rate=0.0002 [--force train]
    prefect deployment run expert-pipeline/pipeline-default --param force='["train"]'
"""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from expert.pipeline_config import (PipelineConfig, StageName, check_local_sources, load_preset,
                                    warn_sections_left_out)
from flows.swallowed_stops import redeliver_swallowed_stops
from tasks.data import format_mmlu, format_pubmedqa
from tasks.evaluate import evaluate_all
from tasks.model import import_model
from tasks.report import report
from tasks.tuning import adapter_of, quantize, select, train


def _run_name() -> str:
    params = flow_run.parameters
    config = PipelineConfig.model_validate(params.get("config") or DEFAULT_PRESET)
    q = config.quantize
    quant = f"gptq{q.bits}" if q.method == "gptq" else q.method
    forced = f" (force {', '.join(params['force'])})" if params.get("force") else ""
    return (f"{config.name}: {config.model.source} {quant} LoRA r{config.train.lora_r} "
            f"lr {config.train.learning_rate:g} on pubmedqa fold {config.data.pubmedqa.fold}{forced}")


# The parameter's default is the default preset (configs/default.yaml), so a deployment run
# with no parameters runs it, and the UI's run form starts from it.
DEFAULT_PRESET = load_preset("default")


@flow(name="expert-pipeline", flow_run_name=_run_name, validate_parameters=True)
def pipeline(config: PipelineConfig = DEFAULT_PRESET, force: list[StageName] | None = None) -> dict:
    redeliver_swallowed_stops()  # a Ctrl-C or SIGTERM (or SIGHUP) that lands in a finalizer is not lost
    check_local_sources(config)  # a typo in a data path fails now, not after the model import
    warn_sections_left_out(config)  # a partial `config` parameter replaced the whole preset
    ws, again = config.artifacts_dir, set(force or ())
    base = import_model(config.model, ws, force="import_model" in again)
    pubmedqa = format_pubmedqa(config.data.pubmedqa, ws, model=base, force="format_pubmedqa" in again)
    mmlu = format_mmlu(config.data.mmlu, ws, force="format_mmlu" in again)
    quantized = quantize(config.quantize, ws, model=base, data=pubmedqa, force="quantize" in again)
    checkpoints = train(config.train, ws, model=quantized, data=pubmedqa, force="train" in again)
    selected = select(config.select, config.eval, ws, model=quantized, checkpoints=checkpoints, data=pubmedqa,
                      force="select" in again)
    scores = evaluate_all(config.eval, ws, base=base, quantized=quantized if config.quantize.method != "none" else None,
                          expert=adapter_of(selected), pubmedqa=pubmedqa, mmlu=mmlu, force="evaluate" in again)
    final = report(config, ws, parts={**scores, "import_model": base, "format_pubmedqa": pubmedqa, "format_mmlu": mmlu,
                                      "quantize": quantized, "train": checkpoints, "select": selected},
                   force="report" in again)
    return {"report": final["path"], "expert": {"model": quantized["path"], "adapter": adapter_of(selected)["path"]}}
