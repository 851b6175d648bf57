"""quantization_report.png: each quantized layer's error along the depth of the model.

The report's table has a row per linear layer (210 for SmolLM2's 30 blocks); a line per kind of
layer (q_proj, ..., down_proj) across the blocks shows at a glance which kind and which depth lose
the most, and whether gptqmodel's own GPTQ loss agrees with the error measured on held-out text.
Drawn on a private Figure, so no global matplotlib state changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

REPORT_PNG = "quantization_report.png"


def layer_series(layers: list[dict[str, Any]]) -> dict[str, dict[str, list]]:
    """{kind: {"block": [...], "error": [...], "gptq_loss": [...]}} from the report's layer rows.

    A row's name is `<blocks>.<index>.<kind>` (model.layers.3.self_attn.q_proj: block 3, kind
    self_attn.q_proj); rows outside the repeated blocks, or without an error, are left out.
    """
    series: dict[str, dict[str, list]] = {}
    for row in layers:
        parts = row["layer"].split(".")
        index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        if index is None or row.get("output_rel_error") is None:
            continue
        kind = ".".join(parts[index + 1:])
        line = series.setdefault(kind, {"block": [], "error": [], "gptq_loss": []})
        line["block"].append(int(parts[index]))
        line["error"].append(row["output_rel_error"])
        line["gptq_loss"].append(row.get("gptq_loss"))
    return series


def plot_layers(layers: list[dict[str, Any]], path: Path) -> Path | None:
    """Write the plot to `path`; None when there is nothing to draw (nf4, none, no data)."""
    series = layer_series(layers)
    if not series:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with_loss = any(v is not None for line in series.values() for v in line["gptq_loss"])
    fig = Figure(figsize=(12 if with_loss else 6.5, 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if with_loss else 1, squeeze=False)[0]
    panels = [("error", "output relative error (held-out text)")]
    panels += [("gptq_loss", "GPTQ loss (gptqmodel, calibration)")] if with_loss else []
    for ax, (key, title) in zip(axes, panels):
        for kind, line in sorted(series.items()):
            points = [(b, v) for b, v in zip(line["block"], line[key]) if v is not None and v > 0]
            if points:
                ax.plot(*zip(*points), marker=".", linewidth=1, label=kind.rsplit(".", 1)[-1])
        ax.set_yscale("log")
        ax.set_xlabel("block (decoder layer)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
