"""mmlu.png: accuracy per MMLU subject, grouped and coloured by category.

Horizontal bars (subject names are long), one block per category in the fixed category
order, subjects sorted by accuracy inside a block, with the 25% chance line and the
question-weighted average. The Agg backend is chosen on a private Figure, so importing
this module changes no global matplotlib state.
"""

from __future__ import annotations

from pathlib import Path

from expert.evaluation.metrics import MMLU_CATEGORIES

COLORS = {"STEM": "#1f77b4", "humanities": "#d62728", "social sciences": "#2ca02c", "other": "#9467bd"}


def plot_mmlu(metrics: dict, path: Path, title: str = "MMLU") -> Path:
    """Write the per-subject bar chart of `metrics` (from `mmlu_metrics`) to `path`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    rows = _ordered_rows(metrics)
    height = max(3.0, 0.24 * len(rows) + 1.6)
    fig = Figure(figsize=(9, height))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    positions = list(range(len(rows)))[::-1]  # first row on top
    ax.barh(positions, [100 * acc for _, _, acc in rows], color=[COLORS.get(c, "grey") for _, c, _ in rows],
            height=0.75)
    ax.set_yticks(positions, [s.replace("_", " ") for s, _, _ in rows], fontsize=8)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_xlim(0, 100)
    ax.axvline(100 * metrics["chance"], color="black", linestyle="--", linewidth=1)
    ax.axvline(100 * metrics["average"], color="orange", linewidth=1.5)
    ax.set_xlabel("accuracy (%)")
    ax.set_title(f"{title}: average {100 * metrics['average']:.1f}% over {metrics['n']} questions", fontsize=10)
    handles = [Patch(color=COLORS[c], label=f"{c} ({100 * metrics['categories'][c]:.1f}%)")
               for c in MMLU_CATEGORIES if c in metrics["categories"]]
    handles += [ax.lines[0], ax.lines[1]]
    ax.lines[0].set_label("chance (25%)")
    ax.lines[1].set_label("average")
    ax.legend(handles=handles, loc="lower right", fontsize=8, framealpha=0.9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _ordered_rows(metrics: dict) -> list[tuple[str, str, float]]:
    order = {c: i for i, c in enumerate(MMLU_CATEGORIES)}
    rows = [(s, metrics["subject_category"][s], acc) for s, acc in metrics["subjects"].items()]
    return sorted(rows, key=lambda r: (order.get(r[1], len(order)), -r[2], r[0]))
