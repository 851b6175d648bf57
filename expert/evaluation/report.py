"""report.md and the tables in it, with published reference results to compare against.

`markdown_tables(metrics)` returns each table as a list of row dicts, the shape Prefect's
table artifacts take, so the flow can publish exactly what report.md shows.
`REFERENCES` is the one place where published numbers live (percent, as published; None
where a paper gave no macro-F1).
"""

from __future__ import annotations

import math
from pathlib import Path

# Published results, as the original project's README compared against them.
REFERENCES: dict[str, list[dict]] = {
    "pubmedqa": [
        {"model": "GPT-3.5 + Z-Code++", "accuracy": 79.6, "macro_f1": 55.8},
        {"model": "Flan-PaLM (540B)", "accuracy": 79.0, "macro_f1": None},
        {"model": "Human performance", "accuracy": 78.0, "macro_f1": 72.2},
        {"model": "Galactica (120B)", "accuracy": 77.6, "macro_f1": None},
        {"model": "LLaMA-33B-4bit + LoRA (original project)", "accuracy": 75.6, "macro_f1": 54.1},
        {"model": "GPT-4 (0-shot)", "accuracy": 75.2, "macro_f1": None},
        {"model": "PubMedGPT (2.7B)", "accuracy": 74.4, "macro_f1": None},
        {"model": "DRAGON", "accuracy": 73.4, "macro_f1": None},
    ],
    "mmlu": [
        {"model": "LLaMA-13B", "accuracy": 46.9},
        {"model": "LLaMA-33B", "accuracy": 57.8},
        {"model": "LLaMA-33B-4bit (original project)", "accuracy": 56.2},
        {"model": "LLaMA-65B", "accuracy": 63.4},
    ],
}
# Every MMLU number above is 5-shot on the whole test set; a run with other shots, or on a
# subset (eval.mmlu_subjects, eval.mmlu_max_per_subject), is ranked among them only with a caveat.
PUBLISHED_MMLU_SHOTS = 5
MMLU_TEST_QUESTIONS = 14_042
# The categories follow the MMLU paper, not lm-eval: its mmlu_stem / mmlu_other differ by one subject.
CATEGORY_NOTE = ("Categories as in the MMLU paper (hendrycks/test categories.py); lm-eval puts anatomy in STEM, "
                 "so STEM and other are not comparable with its mmlu_stem and mmlu_other.")


def shots_label(num_shots: int | None) -> str:
    """The shots as a label ("5-shot"); None: MMLU metrics that record no shot count (written
    before metrics.json had `num_shots`, or from data without the formatter's stats.json)."""
    return "shot count not recorded" if num_shots is None else f"{num_shots}-shot"


def benchmark_title(metrics: dict) -> str:
    if metrics["benchmark"] == "pubmedqa":
        split = metrics.get("split", "test")
        return "PubMedQA (zero-shot)" if split == "test" else f"PubMedQA (zero-shot, {split} split)"
    return f"MMLU ({shots_label(metrics.get('num_shots'))})"


def mmlu_caveat(metrics: dict) -> str | None:
    """Why the published MMLU rows are not like-for-like with this run; None when they are."""
    if metrics["benchmark"] != "mmlu":
        return None
    reasons = []
    shots = metrics.get("num_shots")
    if shots != PUBLISHED_MMLU_SHOTS:
        this = "records no shot count" if shots is None else f"is {shots}-shot"
        reasons.append(f"the published results are {PUBLISHED_MMLU_SHOTS}-shot and this run {this} "
                       "(data.mmlu.num_shots)")
    if is_mmlu_subset(metrics):
        reasons.append(mmlu_subset_note(metrics))
    if not reasons:
        return None
    return "Not like-for-like: " + "; ".join(reasons) + ", so its rank among them is indicative only."


def is_mmlu_subset(metrics: dict) -> bool:
    """Fewer (or other) questions than the full test set the published results are on."""
    return metrics["n"] != MMLU_TEST_QUESTIONS


def mmlu_subset_note(metrics: dict) -> str:
    """What scoring n of MMLU's questions means for a comparison, with the accuracy's standard error."""
    n, accuracy = metrics["n"], metrics["average"]
    error = 100 * math.sqrt(accuracy * (1 - accuracy) / n) if n else float("nan")
    return (f"this run scored n={n:,} of MMLU's {MMLU_TEST_QUESTIONS:,} test questions (eval.mmlu_subjects, "
            f"eval.mmlu_max_per_subject; standard error about \u00b1{error:.1f} points) and the published "
            "results all of them")


def _pct(value: float | None) -> float | None:
    return None if value is None else round(100 * value, 1)


def comparison_rows(metrics: dict, run_name: str = "this run") -> list[dict]:
    """Reference rows plus this run's row, ranked by accuracy (this run first on a tie)."""
    benchmark = metrics["benchmark"]
    if benchmark == "pubmedqa":
        ours = {"model": f"**{run_name}**", "accuracy": _pct(metrics["accuracy"]),
                "macro_f1": _pct(metrics["macro_f1"])}
    else:
        ours = {"model": f"**{run_name}**", "accuracy": _pct(metrics["average"])}
    # The published PubMedQA results are test-split numbers: a dev-split run is not ranked among them.
    references = [dict(r) for r in REFERENCES[benchmark]] if metrics.get("split", "test") == "test" else []
    if mmlu_caveat(metrics):
        # The table is also published on its own (a Prefect table artifact), without the
        # report's caveat, so each row says its shots and questions where they differ.
        ours["model"] += f" ({_mmlu_row_label(metrics.get('num_shots'), metrics['n'], metrics)})"
        for row in references:
            row["model"] += f" ({_mmlu_row_label(PUBLISHED_MMLU_SHOTS, MMLU_TEST_QUESTIONS, metrics)})"
    rows = sorted([ours] + references, key=lambda r: (-r["accuracy"], r is not ours))
    table = []
    for rank, row in enumerate(rows, 1):
        out = {"rank": rank, "model": row["model"], "accuracy (%)": row["accuracy"]}
        if benchmark == "pubmedqa":
            out["macro-F1 (%)"] = row["macro_f1"] if row["macro_f1"] is not None else "-"
        table.append(out)
    return table


def _mmlu_row_label(shots: int | None, n: int, metrics: dict) -> str:
    """The row's shots (when the run's differ from the published) and questions (when a subset)."""
    parts = [shots_label(shots)] if metrics.get("num_shots") != PUBLISHED_MMLU_SHOTS else []
    return ", ".join(parts + ([f"n={n:,}"] if is_mmlu_subset(metrics) else []))


def markdown_tables(metrics: dict, run_name: str = "this run") -> dict[str, list[dict]]:
    """Every table of report.md as {title: rows}; rows are dicts of JSON-ready cells."""
    tables = {"comparison": comparison_rows(metrics, run_name)}
    if metrics["benchmark"] == "pubmedqa":
        tables.update(_pubmedqa_tables(metrics))
    else:
        tables.update(_mmlu_tables(metrics))
    return tables


def _pubmedqa_tables(m: dict) -> dict[str, list[dict]]:
    base = m["majority_baseline"]
    summary = [
        {"metric": "accuracy (%)", "value": _pct(m["accuracy"])},
        {"metric": "macro-F1 (%)", "value": _pct(m["macro_f1"])},
        {"metric": f"majority baseline ('{base['label']}') accuracy (%)", "value": _pct(base["accuracy"])},
        {"metric": "majority baseline macro-F1 (%)", "value": _pct(base["macro_f1"])},
        {"metric": "questions", "value": m["n"]},
    ]
    per_class = [{"label": label, "precision (%)": _pct(v["precision"]), "recall (%)": _pct(v["recall"]),
                  "F1 (%)": _pct(v["f1"]), "support": v["support"]} for label, v in m["per_class"].items()]
    confusion = [{"gold \\ predicted": gold, **{p: n for p, n in zip(m["labels"], row)}}
                 for gold, row in zip(m["labels"], m["confusion"])]
    return {"summary": summary, "per_class": per_class, "confusion": confusion}


def _mmlu_tables(m: dict) -> dict[str, list[dict]]:
    base = m["majority_letter_baseline"]
    summary = [
        {"metric": "average accuracy, question-weighted (%)", "value": _pct(m["average"])},
        {"metric": "mean of subject accuracies (%)", "value": _pct(m["subject_mean"])},
        {"metric": "chance (%)", "value": _pct(m["chance"])},
        {"metric": f"majority letter ('{base['letter']}') baseline (%)", "value": _pct(base["accuracy"])},
        {"metric": "questions", "value": m["n"]},
        {"metric": "subjects", "value": len(m["subjects"])},
    ]
    categories = [{"category": c, "accuracy (%)": _pct(acc), "questions": m["category_n"][c]}
                  for c, acc in m["categories"].items()]
    subjects = sorted(m["subjects"], key=lambda s: (m["subject_category"][s], s))
    subject_rows = [{"subject": s, "category": m["subject_category"][s], "accuracy (%)": _pct(m["subjects"][s]),
                     "questions": m["subject_n"][s]} for s in subjects]
    return {"summary": summary, "categories": categories, "subjects": subject_rows}


def to_markdown(rows: list[dict]) -> str:
    """A GitHub-flavoured markdown table of row dicts (columns from the first row)."""
    if not rows:
        return "(no rows)\n"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    return "-" if value is None else str(value).replace("|", "\\|")


_TITLES = {"summary": "Summary", "comparison": "Comparison with published results",
           "per_class": "Per class", "confusion": "Confusion matrix (rows gold, columns predicted)",
           "categories": "Categories", "subjects": "Subjects"}


def render_report(metrics: dict, run_name: str = "this run", details: dict | None = None) -> str:
    """report.md text: what was run, then every table; MMLU links its plot."""
    parts = [f"# {benchmark_title(metrics)}: {run_name}\n"]
    if details:
        parts.append("\n".join(f"- {key}: {value}" for key, value in details.items()) + "\n")
    tables = markdown_tables(metrics, run_name)
    order = ["summary", "comparison"] + [t for t in tables if t not in ("summary", "comparison")]
    notes = {"comparison": mmlu_caveat(metrics), "categories": CATEGORY_NOTE}
    for title in order:
        note = f"{notes[title]}\n\n" if notes.get(title) else ""
        parts.append(f"## {_TITLES.get(title, title)}\n\n" + note + to_markdown(tables[title]))
        if title == "comparison" and metrics["benchmark"] == "mmlu":
            parts.append("![MMLU accuracy per subject](mmlu.png)\n")
    return "\n".join(parts)


def write_report(path: Path, metrics: dict, run_name: str = "this run", details: dict | None = None) -> Path:
    path.write_text(render_report(metrics, run_name, details))
    return path
