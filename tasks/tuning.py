"""Prefect tasks: quantize the base model, train LoRA on it, select the best checkpoint.

No retries here: these are the GPU stages, where a retry would only repeat a failure (a
restarted training run resumes from its last checkpoint instead).
"""

from __future__ import annotations

from prefect.artifacts import create_table_artifact

from expert.evaluation import EvalConfig
from expert.quantize import QuantizeConfig
from expert.select import SelectConfig
from expert.stages import Quantize, Select, Train
from expert.train import TrainConfig
from tasks.fanout import fan_out
from tasks.stage import read_json, run_stage


def quantize(config: QuantizeConfig, workspace: str, model: dict, data: dict, force: bool = False) -> dict:
    # Task-text calibration and the perplexity check read the formatted data.
    uses_data = config.method == "gptq" and (config.calibration == "task" or config.perplexity_samples)
    return run_stage(Quantize(), config, workspace, upstream={"model": model, "data": data if uses_data else None},
                     force=force, label=f"quantize {config.method}" + (f" {config.bits}-bit" if config.method == "gptq" else ""))


def train(config: TrainConfig, workspace: str, model: dict, data: dict, force: bool = False) -> dict:
    return run_stage(Train(), config, workspace, upstream={"model": model, "data": data}, force=force,
                     label=f"train LoRA r{config.lora_r}")


def select(config: SelectConfig, eval_config: EvalConfig, workspace: str, model: dict, checkpoints: dict,
           data: dict, force: bool = False) -> dict:
    ref = run_stage(Select(eval_config=eval_config, fan_out=fan_out(eval_config.runner)), config, workspace,
                    force=force, upstream={"model": model, "train": checkpoints, "data": data},
                    label=f"select by dev {config.metric}")
    create_table_artifact(read_json(ref, "scores.json"), key="checkpoint-dev-scores",
                          description=f"dev scores per checkpoint; selected by {config.metric}")
    return ref


def adapter_of(selection: dict) -> dict:
    """The selected adapter inside the select artifact, as an upstream ref."""
    return {**selection, "path": selection["path"] + "/adapter"}
