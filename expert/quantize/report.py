"""Measurements of the quantize stage, and its report (`quantization_report.json` + `.md`).

- perplexity of a model on held-out texts (token-weighted, one text per forward, no padding);
- per-layer reconstruction error of a quantized model: for each quantized linear layer, the
  relative error of its output against the same input through the original full-precision weight,
  read one tensor at a time from the base checkpoint (so no second full copy is ever held). It is
  measured on held-out text, on the inputs the quantized model itself produces: the quantity GPTQ
  minimizes layer by layer (gptqmodel's own per-module loss on the calibration samples is put
  beside it);
- bytes on disk of the weight files.
"""

from __future__ import annotations

import json
import math
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPORT_JSON = "quantization_report.json"
REPORT_MD = "quantization_report.md"


@torch.no_grad()
def perplexity(model: Any, tokenizer: Any, texts: list[str], max_length: int) -> dict[str, float]:
    """exp(mean next-token NLL) over every predicted token of `texts` (each cut to `max_length`)."""
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"]
        if ids.shape[1] < 2:
            continue
        ids = ids.to(device)
        logits = model(input_ids=ids).logits[0, :-1].float()
        total_nll += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        total_tokens += ids.shape[1] - 1
    if total_tokens == 0:
        return {"perplexity": float("nan"), "tokens": 0}
    return {"perplexity": math.exp(total_nll / total_tokens), "tokens": total_tokens}


@torch.no_grad()
def layer_errors(model: Any, tokenizer: Any, base_dir: Path, texts: list[str],
                 max_length: int) -> list[dict[str, Any]]:
    """Relative output error ||y_q - y|| / ||y|| of every quantized linear layer of `model`.

    y is the same input through the original weight of `base_dir` (safetensors), loaded lazily.
    A layer whose original weight cannot be found is reported with error None.
    """
    layers = {name: m for name, m in model.named_modules() if getattr(m, "qweight", None) is not None}
    sums = {name: [0.0, 0.0] for name in layers}
    with ExitStack() as stack:
        weights = _lazy_weights(base_dir, stack)
        hooks = [m.register_forward_hook(_error_hook(name, weights, sums[name]))
                 for name, m in layers.items()]
        try:
            for text in texts:
                ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)
                model(input_ids=ids["input_ids"].to(next(model.parameters()).device))
        finally:
            for hook in hooks:
                hook.remove()
    return [{"layer": name, "in_features": m.in_features, "out_features": m.out_features,
             "output_rel_error": math.sqrt(err / ref) if ref > 0 else None}
            for (name, m), (err, ref) in zip(layers.items(), sums.values())]


def _lazy_weights(base_dir: Path, stack: ExitStack) -> dict[str, Any]:
    """tensor name -> open safetensors handle holding it, for every *.safetensors of `base_dir`."""
    from safetensors import safe_open

    where = {}
    for path in sorted(Path(base_dir).glob("*.safetensors")):
        handle = stack.enter_context(safe_open(str(path), framework="pt"))
        where.update({key: handle for key in handle.keys()})
    return where


def _error_hook(name: str, weights: dict[str, Any], acc: list[float]):
    def hook(module, args, output):
        if f"{name}.weight" not in weights:
            acc[1] = 0.0  # no reference: reported as None
            return
        x = args[0]
        w = weights[f"{name}.weight"].get_tensor(f"{name}.weight").to(x.device, torch.float32)
        bias = weights.get(f"{name}.bias")
        b = bias.get_tensor(f"{name}.bias").to(x.device, torch.float32) if bias is not None else None
        ref = F.linear(x.float(), w, b)
        acc[0] += (output.float() - ref).pow(2).sum().item()
        acc[1] += ref.pow(2).sum().item()
    return hook


def weights_bytes(folder: Path) -> int:
    """Bytes of the weight files (*.safetensors, *.bin) of a model folder."""
    folder = Path(folder)
    return sum(p.stat().st_size for pattern in ("*.safetensors", "*.bin") for p in folder.glob(pattern))


def write_report(out_dir: Path, report: dict[str, Any]) -> None:
    """Write `quantization_report.json`, a human-readable `quantization_report.md`, and where
    layers were measured, their errors by depth in `quantization_report.png`."""
    from expert.quantize.plots import REPORT_PNG, plot_layers

    out_dir = Path(out_dir)
    (out_dir / REPORT_JSON).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    plot = plot_layers(report.get("layers") or [], out_dir / REPORT_PNG)
    (out_dir / REPORT_MD).write_text(render_markdown(report, plot.name if plot else None))


def render_markdown(report: dict[str, Any], plot: str | None = None) -> str:
    lines = [f"# Quantization report ({report['method']})", ""]
    settings = ", ".join(f"{k}={v}" for k, v in report["settings"].items())
    lines += [f"Settings: {settings}", ""]
    if report.get("calibration"):
        cal = report["calibration"]
        lines += [f"Calibration: {cal['source']}; {cal['samples']} samples, {cal['tokens']} tokens", ""]
    size = report["size_bytes"]
    lines += ["| measure | value |", "| --- | --- |"]
    after = "none stored (quantized at load time)" if size["after"] is None else _mib(size["after"])
    lines += [f"| weights before | {_mib(size['before'])} |", f"| weights after | {after} |"]
    for stage, seconds in report["time_s"].items():
        lines.append(f"| time: {stage} | {seconds:.1f} s |")
    if report.get("resumed_at_layer"):
        lines.append(f"| GPTQ resumed at layer | {report['resumed_at_layer']} (the layers before it came from an "
                     "interrupted run's checkpoints; the times are this run's only) |")
    ppl = report.get("perplexity")
    if ppl:
        lines += [f"| perplexity, unquantized | {ppl['unquantized']:.3f} |",
                  f"| perplexity, quantized | {ppl['quantized']:.3f} |",
                  f"| perplexity change | {ppl['change_pct']:+.2f} % |"]
    lines.append("")
    if not ppl:
        lines += [f"Perplexity not measured: {report.get('perplexity_note', 'skipped')}.", ""]
    else:
        lines += [f"Perplexity on {ppl['texts']} held-out texts ({ppl['tokens']} tokens): {ppl['source']}.", ""]
    lines += _layer_table(report.get("layers") or [], report.get("layers_note", ""), plot)
    return "\n".join(lines) + "\n"


def _layer_table(layers: list[dict[str, Any]], note: str, plot: str | None) -> list[str]:
    if not layers:
        return []
    lines = ["## Per-layer reconstruction error", "", note, ""]
    lines += [f"![each kind of layer's error by depth]({plot})", ""] if plot else []
    lines += ["| layer | in | out | output rel. error | GPTQ loss |", "| --- | --- | --- | --- | --- |"]
    for row in layers:
        err, loss = row["output_rel_error"], row.get("gptq_loss")
        lines.append(f"| {row['layer']} | {row['in_features']} | {row['out_features']} | "
                     f"{'n/a' if err is None else f'{err:.4f}'} | {'n/a' if loss is None else f'{loss:.3g}'} |")
    return lines + [""]


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
