"""The quantize stage's run: calibration, GPTQ (or an nf4/none record), measurements, report.

See the package docstring (`expert.quantize`) for what it writes and in which order.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any, Callable

from expert.modeling import load_model, load_tokenizer
from expert.quantize.calibration import calibration_texts, heldout_texts, tokenize_samples
from expert.quantize.checkpoint import LayerProgress
from expert.quantize.config import QuantizeConfig
from expert.quantize.gptq import block_count, check_group_size, run_gptq
from expert.quantize.nf4 import NF4_SETTINGS, write_record
from expert.quantize.report import layer_errors, perplexity, weights_bytes, write_report

__all__ = ["quantize", "summary"]

Progress = Callable[[int, int], None]
_STEPS = 4  # baseline perplexity, quantize + save, reload + measure, report; GPTQ adds one per layer
_LAYER_ERROR_TEXTS = 8  # enough for a stable ratio; each text re-reads every original weight
_LAYERS_NOTE = ("output rel. error: relative error of each quantized layer's output against the "
                "original weight on the same input (held-out text through the quantized model). "
                "GPTQ loss: gptqmodel's own per-module loss on the calibration samples.")


def quantize(config: QuantizeConfig, model_dir: Path, data_dir: Path | None, out_dir: Path,
             progress: Progress | None = None, work_dir: Path | None = None) -> dict[str, Any]:
    """Run the stage into `out_dir`; return the report's summary (small, JSON-ready).

    `work_dir`: a folder that outlives a crash, where GPTQ commits each quantized layer where it
    can (checkpoint.py); a rerun with the same folder continues after the last one.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = _base_report(config, model_dir)
    begin = time.perf_counter()
    calibration, gptq_log, layers = None, [], 0
    if config.method == "gptq":  # every check that can fail comes before minutes of work
        check_group_size(model_dir, config.group_size)
        calibration = _calibration(config, model_dir, data_dir, report)
        layers = block_count(model_dir)
    steps = _STEPS + layers
    tick = (lambda done: progress(done, steps)) if progress else (lambda done: None)
    start = time.perf_counter()
    texts = heldout_texts(data_dir, config.perplexity_samples, config.seed)
    baseline = _measure(model_dir, texts, config.max_length)
    report["time_s"]["perplexity_unquantized"] = time.perf_counter() - start
    tick(1)
    if calibration is not None:
        start = time.perf_counter()
        progress_by_layer = LayerProgress(layers, lambda done, total: tick(1 + done))
        gptq_log = run_gptq(config, model_dir, *calibration, out_dir, work_dir=work_dir, layers=progress_by_layer)
        if progress_by_layer.first:  # the layers before came from an interrupted run's checkpoints
            report["resumed_at_layer"] = progress_by_layer.first + 1
        gc.collect()
        report["time_s"]["quantize_and_save"] = time.perf_counter() - start
    else:
        write_record(config, model_dir, out_dir)
    tick(2 + layers)
    start = time.perf_counter()
    _measure_result(config, model_dir, out_dir, texts, baseline, report)
    _add_gptq_loss(report["layers"], gptq_log)
    report["time_s"]["evaluate_quantized"] = time.perf_counter() - start
    # nf4 / none store no weights: the base is read (and, for nf4, quantized) at load time.
    report["size_bytes"]["after"] = weights_bytes(out_dir) if config.method == "gptq" else None
    report["time_s"]["total"] = time.perf_counter() - begin
    tick(3 + layers)
    write_report(out_dir, report)
    tick(steps)
    return summary(report)


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The few numbers a manifest or a flow log wants (the full report stays on disk)."""
    ppl = report.get("perplexity") or {}
    return {"method": report["method"], "time_s": report["time_s"], "size_bytes": report["size_bytes"],
            "perplexity_unquantized": ppl.get("unquantized"), "perplexity_quantized": ppl.get("quantized")}


def _base_report(config: QuantizeConfig, model_dir: Path) -> dict[str, Any]:
    import transformers

    versions = {"transformers": transformers.__version__}
    if config.method == "gptq":
        import gptqmodel
        import optimum.version

        versions |= {"optimum": optimum.version.__version__, "gptqmodel": gptqmodel.__version__}
    settings = config.canonical()  # for nf4 and none without the GPTQ fields, which do not apply
    if config.method == "nf4":
        settings |= NF4_SETTINGS
    return {"method": config.method, "settings": settings, "versions": versions, "time_s": {},
            "size_bytes": {"before": weights_bytes(model_dir)}, "calibration": None,
            "perplexity": None, "layers": [], "layers_note": ""}


def _calibration(config: QuantizeConfig, model_dir: Path, data_dir: Path | None,
                 report: dict[str, Any]) -> tuple[list[dict], Any]:
    """(tokenized calibration samples, tokenizer); notes the source in the report."""
    tokenizer = load_tokenizer(model_dir)
    texts, source = calibration_texts(config.calibration, data_dir, tokenizer, config.num_samples,
                                      config.max_length, config.seed)
    samples = tokenize_samples(texts, tokenizer, config.max_length)
    report["calibration"] = {"source": source, "samples": len(samples),
                             "tokens": sum(int(s["input_ids"].shape[1]) for s in samples)}
    return samples, tokenizer


def _measure(model_dir: Path, texts: list[str], max_length: int) -> dict[str, float] | None:
    """Perplexity of a model folder on `texts`, the model freed before returning."""
    if not texts:
        return None
    model, tokenizer = load_model(model_dir)
    result = perplexity(model, tokenizer, texts, max_length)
    del model
    gc.collect()
    return result


def _measure_result(config: QuantizeConfig, model_dir: Path, out_dir: Path, texts: list[str],
                    baseline: dict[str, float] | None, report: dict[str, Any]) -> None:
    """Reload the stage's output as later stages will; fill perplexity and per-layer error."""
    if baseline is None:
        report["perplexity_note"] = ("perplexity_samples is 0" if config.perplexity_samples == 0
                                     else "no data folder with dev.parquet was given")
        return
    if config.method == "none":  # the same model: nothing to compare
        model, after = None, baseline
    else:
        model, tokenizer = load_model(out_dir)
        after = perplexity(model, tokenizer, texts, config.max_length)
    report["perplexity"] = {
        "unquantized": baseline["perplexity"], "quantized": after["perplexity"],
        "change_pct": 100 * (after["perplexity"] / baseline["perplexity"] - 1),
        "texts": len(texts), "tokens": after["tokens"],
        "source": "dev.parquet, prompt + ' ' + answer, seeded sample"}
    if config.method == "gptq":
        report["layers"] = layer_errors(model, tokenizer, model_dir, texts[:_LAYER_ERROR_TEXTS],
                                        config.max_length)
        report["layers_note"] = _LAYERS_NOTE
    del model
    gc.collect()


def _add_gptq_loss(layers: list[dict[str, Any]], log: list[dict[str, Any]]) -> None:
    """Put gptqmodel's per-module GPTQ loss beside each layer's measured output error."""
    loss = {(row["layer"], row["module"]): row["loss"] for row in log}
    for row in layers:
        parts = row["layer"].split(".")  # model.layers.N.self_attn.q_proj
        index = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        if index is not None:
            row["gptq_loss"] = loss.get((int(parts[index]), ".".join(parts[index + 1:])))
