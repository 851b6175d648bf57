"""results.png: the pipeline report's numbers at a glance.

Left, PubMedQA: accuracy and macro-F1 of every evaluated model (base, quantized, expert), with
the original project's result (75.6 / 54.1), GPT-4's zero-shot accuracy (75.2) and the
majority-class baseline (always the most frequent gold answer of the split) as lines: a model
below that line has learned less than the label prior. Right, MMLU: accuracy per category,
base beside expert, with chance: what tuning cost in general knowledge. The Agg backend is used
on a private Figure, so no global matplotlib state changes.
"""

from __future__ import annotations

from pathlib import Path

MODEL_ORDER = ("base", "quantized", "expert")
ORIGINAL = {"accuracy": 75.6, "macro_f1": 54.1}  # LLaMA-33B 4-bit + LoRA, the project this builds on
GPT4_ACCURACY = 75.2
MODEL_COLORS = {"base": "#7f7f7f", "quantized": "#bcbd22", "expert": "#17becf"}  # none of mmlu.png's categories


def pubmedqa_bars(runs: dict[str, dict]) -> list[tuple[str, float, float]]:
    """(model, accuracy %, macro-F1 %) in pipeline order."""
    return [(n, 100 * runs[n]["accuracy"], 100 * runs[n]["macro_f1"]) for n in _in_order(runs)]


def majority_baseline(runs: dict[str, dict]) -> dict | None:
    """Always answering the split's most frequent label ({label, accuracy, macro_f1}, as metrics.json
    records it); every PubMedQA run of a report scores the same split."""
    return next((m["majority_baseline"] for m in runs.values() if m.get("majority_baseline")), None)


def majority_accuracy(runs: dict[str, dict]) -> float | None:
    """The majority baseline's accuracy (%)."""
    majority = majority_baseline(runs)
    return None if majority is None else 100 * majority["accuracy"]


def mmlu_bars(runs: dict[str, dict]) -> tuple[list[str], dict[str, list[float | None]]]:
    """Categories in MMLU's order (then "average"), and each model's accuracy (%) on them."""
    from expert.evaluation.metrics import MMLU_CATEGORIES  # imports scikit-learn: not on a cached rerun

    present = {c for m in runs.values() for c in m.get("categories", {})}
    categories = [c for c in MMLU_CATEGORIES if c in present]
    values = {n: [_pct(runs[n]["categories"].get(c)) for c in categories] + [_pct(runs[n]["average"])]
              for n in _in_order(runs)}
    return categories + ["average"], values


def _in_order(runs: dict[str, dict]) -> list[str]:
    """The pipeline's models in its order (base, quantized, expert), any others after them."""
    return [n for n in MODEL_ORDER if n in runs] + sorted(n for n in runs if n not in MODEL_ORDER)


def plot_results(summary: dict, path: Path) -> Path | None:
    """Write results.png from the report's summary; None when nothing was evaluated."""
    pubmedqa, mmlu = summary.get("pubmedqa") or {}, summary.get("mmlu") or {}
    if not pubmedqa and not mmlu:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [p for p, runs in (("pubmedqa", pubmedqa), ("mmlu", mmlu)) if runs]
    fig = Figure(figsize=(6.5 * len(panels), 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        if panel == "pubmedqa":
            _pubmedqa_panel(ax, pubmedqa, summary.get("config", {}).get("eval", {}).get("pubmedqa_split", "test"))
        else:
            _mmlu_panel(ax, mmlu)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _pubmedqa_panel(ax, runs: dict[str, dict], split: str) -> None:
    bars = pubmedqa_bars(runs)
    x = range(len(bars))
    width = 0.38
    ax.bar([i - width / 2 for i in x], [acc for _, acc, _ in bars], width, label="accuracy", color="#1f77b4")
    ax.bar([i + width / 2 for i in x], [f1 for _, _, f1 in bars], width, label="macro-F1", color="#ff7f0e")
    for i, (_, acc, f1) in enumerate(bars):
        ax.annotate(f"{acc:.1f}", (i - width / 2, acc), ha="center", va="bottom", fontsize=8)
        ax.annotate(f"{f1:.1f}", (i + width / 2, f1), ha="center", va="bottom", fontsize=8)
    if split == "test":  # the published numbers are test-split numbers
        ax.axhline(ORIGINAL["accuracy"], color="#1f77b4", linestyle="--", linewidth=1,
                   label=f"LLaMA-33B 4-bit + LoRA accuracy ({ORIGINAL['accuracy']})")
        ax.axhline(ORIGINAL["macro_f1"], color="#ff7f0e", linestyle="--", linewidth=1,
                   label=f"LLaMA-33B 4-bit + LoRA macro-F1 ({ORIGINAL['macro_f1']})")
        ax.axhline(GPT4_ACCURACY, color="grey", linestyle=":", linewidth=1, label=f"GPT-4 0-shot ({GPT4_ACCURACY})")
    majority = majority_accuracy(runs)
    if majority is not None:
        ax.axhline(majority, color="black", linewidth=1, label=f"always the majority answer ({majority:.1f})")
    n = next(iter(runs.values()))["n"]
    _finish(ax, [name for name, _, _ in bars], "%", f"PubMedQA, {split} split ({n} questions)", "upper left")


def _mmlu_panel(ax, runs: dict[str, dict]) -> None:
    labels, values = mmlu_bars(runs)
    width = 0.8 / max(1, len(values))
    for k, (name, row) in enumerate(values.items()):
        offsets = [i - 0.4 + width * (k + 0.5) for i in range(len(labels))]
        ax.bar(offsets, [v if v is not None else 0 for v in row], width, label=name,
               color=MODEL_COLORS.get(name, "#bcbd22"))
        for x, v in zip(offsets, row):
            if v is not None:
                ax.annotate(f"{v:.1f}", (x, v), ha="center", va="bottom", fontsize=7)
    chance = next(iter(runs.values())).get("chance", 0.25)
    ax.axhline(100 * chance, color="black", linestyle="--", linewidth=1, label=f"chance ({100 * chance:.0f}%)")
    n = next(iter(runs.values()))["n"]
    _finish(ax, labels, "accuracy (%)", f"MMLU by category ({n} questions)", "upper right")


def _finish(ax, ticks: list[str], ylabel: str, title: str, legend: str) -> None:
    """What both panels share: 0-100% axis, tick labels, title, legend, grid."""
    ax.set_xticks(range(len(ticks)), ticks, fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc=legend, framealpha=0.9)
    ax.grid(axis="y", alpha=0.3)


def _pct(value: float | None) -> float | None:
    return None if value is None else 100 * value
