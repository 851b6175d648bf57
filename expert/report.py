"""The pipeline's final report: base vs quantized vs tuned expert, in one place.

Reads the upstream artifacts (evaluations, quantization report, training summary,
selection) and writes `report.md` with its plots beside it, and `summary.json`:
{"pubmedqa": {"base", "quantized", "expert"}, "mmlu": {"base", "expert"},
 "timings_s": {stage: seconds}, "config": {...}}.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path
from typing import Any

from expert.evaluation.report import (CATEGORY_NOTE, REFERENCES, is_mmlu_subset, mmlu_subset_note, shots_label,
                                      to_markdown)
from expert.report_plots import majority_baseline, plot_results

PLOTS = {"select": "dev_scores.png", "train": "loss.png", "mmlu/expert": "mmlu.png"}
RESULTS_PLOT = "results.png"
HEADLINE = {"pubmedqa": ("accuracy", "macro_f1", "n"), "mmlu": ("average", "subject_mean", "n")}


def write_pipeline_report(upstream: dict[str, Path], config: dict[str, Any], out_dir: Path) -> dict:
    """`upstream` maps roles ("pubmedqa/base", "mmlu/expert", "quantize", "train", ...) to artifact folders."""
    out_dir = Path(out_dir)
    summary: dict[str, Any] = {"pubmedqa": {}, "mmlu": {}, "timings_s": {}, "config": config}
    for role, path in sorted(upstream.items()):
        manifest = _json(path / "manifest.json")
        summary["timings_s"][role] = manifest.get("timings", {}).get("seconds")
        if "/" in role:
            benchmark, which = role.split("/", 1)
            summary[benchmark][which] = _json(path / "metrics.json")
    for role, name in PLOTS.items():
        if role in upstream and (upstream[role] / name).is_file():
            shutil.copy2(upstream[role] / name, out_dir / name.replace(".png", f"_{role.replace('/', '_')}.png"))
    details = {role: _json(upstream[role] / name) for role, name in
               (("quantize", "quantization_report.json"), ("train", "summary.json"), ("select", "selection.json"))
               if role in upstream}
    if "select" in upstream:
        details["select"]["per checkpoint"] = json.loads((upstream["select"] / "scores.json").read_text())
        # Where the expert is, in the store's terms (select/KEY), for `expert export` and for programs.
        summary["expert"] = {"adapter": f"select/{upstream['select'].name}/adapter"}
        if "quantize" in upstream:
            summary["expert"]["base"] = f"quantize/{upstream['quantize'].name}"
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    plot_results(summary, out_dir / RESULTS_PLOT)
    (out_dir / "report.md").write_text(render(summary, details, sorted(p.name for p in out_dir.glob("*.png"))))
    return {b: {w: {k: m.get(k) for k in HEADLINE[b]} for w, m in summary[b].items()} for b in HEADLINE}


def render(summary: dict, details: dict, plots: list[str]) -> str:
    model = summary["config"].get("model", {}).get("source", "?")
    lines = [f"# EXPERT report: {summary['config'].get('name', '')}", "", f"Base model: `{model}`", ""]
    if RESULTS_PLOT in plots:  # the numbers at a glance, before the tables
        lines += [f"![results]({RESULTS_PLOT})", ""]
        plots = [p for p in plots if p != RESULTS_PLOT]
    split = summary["config"].get("eval", {}).get("pubmedqa_split", "test")
    lines += [f"## PubMedQA (reasoning-required, {split} split)", ""]
    if split != "test":  # the published results are test-split numbers: no ranking among them
        lines += [f"The published results are on the test split; this run scored the {split} split (the one "
                  "select chose the checkpoint on), so they are left out.", ""]
    lines += [to_markdown(pubmedqa_rows(summary["pubmedqa"], published=split == "test")), ""]
    if summary["mmlu"]:
        lines += [f"## {mmlu_heading(summary['mmlu'])}: what tuning costs in general knowledge", "",
                  to_markdown(mmlu_rows(summary["mmlu"])), ""] + mmlu_notes(summary["mmlu"])
    lines += scoring_notes(summary)
    for role, title in (("quantize", "Quantization"), ("train", "Training"), ("select", "Checkpoint selection")):
        if role in details:
            lines += [f"## {title}", "", to_markdown(_flat_rows(details[role])), ""]
        if role == "select" and details.get("select", {}).get("per checkpoint"):
            rows = [{k: _round(v) for k, v in row.items()} for row in details["select"]["per checkpoint"]]
            lines += ["Dev scores per checkpoint:", "", to_markdown(rows), ""]
        if role == "select" and summary.get("expert"):
            where = summary["expert"]
            base = f" on the base `{where['base']}`" if "base" in where else ""
            lines += [f"The expert is the adapter `{where['adapter']}`{base}, in the artifact store. "
                      f"`expert export ARTIFACTS/{where['adapter'].removesuffix('/adapter')} --out DIR` writes both "
                      "into one folder with a model card that says how to load and ask it.", ""]
    timings = [{"stage": k, "seconds (when built)": v} for k, v in summary["timings_s"].items()]
    lines += ["## Stage timings", "", to_markdown(timings), ""]
    lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def inline_images(markdown: str, folder: Path) -> str:
    """`![x](plot.png)` links to files in `folder` become data URIs, for viewers (the Prefect UI)
    that show the markdown without the folder beside it."""
    def embed(match: re.Match) -> str:
        path = Path(folder) / match.group(2)
        if "/" in match.group(2) or not path.is_file():
            return match.group(0)
        return f"![{match.group(1)}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})"

    return re.sub(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)", embed, markdown)


def pubmedqa_rows(runs: dict[str, dict], published: bool = True) -> list[dict]:
    """This run's models among the published results (if `published`), ranked by accuracy."""
    rows = [{"model": r["model"], "accuracy (%)": r["accuracy"],
             "macro-F1 (%)": "-" if r["macro_f1"] is None else r["macro_f1"]}
            for r in (REFERENCES["pubmedqa"] if published else [])]
    rows += [{"model": f"**{name}** (this run, n={m['n']})", "accuracy (%)": round(100 * m["accuracy"], 1),
              "macro-F1 (%)": round(100 * m["macro_f1"], 1)} for name, m in runs.items()]
    majority = majority_baseline(runs)
    if majority:  # what the label prior alone scores on this split: the floor a model must clear
        rows.append({"model": f"always '{majority['label']}' (the split's majority answer)",
                     "accuracy (%)": round(100 * majority["accuracy"], 1),
                     "macro-F1 (%)": round(100 * majority["macro_f1"], 1)})
    return [{"rank": i, **r} for i, r in enumerate(sorted(rows, key=lambda r: -r["accuracy (%)"]), 1)]


def scoring_notes(summary: dict) -> list[str]:
    """Where, in what dtype and with which GPTQ kernel each evaluation scored, and a warning when
    they differ.

    eval.dtype 'auto' is resolved on the machine that scores, and cached evaluations keep the
    precision they were scored in: one report can hold a float32 base (scored on a CPU before
    'auto' meant bf16 there, or on a CPU without native bf16) beside a bf16 expert. Likewise
    eval.gptq_kernel 'auto' picks by GPU generation (Machete on a Hopper, Marlin on an Ampere).
    """
    seen, precisions, kernels = {}, set(), set()
    for benchmark in HEADLINE:
        for name, metrics in summary[benchmark].items():
            timing = metrics.get("timing") or {}
            if not timing.get("dtype"):
                seen[f"{benchmark} {name}"] = "not recorded"  # unknown is no proof of a difference
                continue
            where = f"{str(timing.get('device', '?')).split(':')[0]}, {timing['dtype']}"
            precisions.add(where)
            if timing.get("gptq_kernel"):  # GPTQ models only: a float base has no kernel to differ in
                kernels.add(timing["gptq_kernel"])
                where += f", {timing['gptq_kernel']}"
            seen[f"{benchmark} {name}"] = where
    if not seen:
        return []
    lines = ["Scored on: " + "; ".join(f"{run} ({where})" for run, where in seen.items()) + ".", ""]
    if len(precisions) > 1:
        lines += ["**These evaluations were scored in different precisions.** A difference the size of that "
                  "rounding (bf16 can flip a near-tie) is not the quantization's or the tuning's. To score them "
                  "alike, set `eval.dtype` (and `eval.device`) by name, or rerun them with `--force evaluate`.", ""]
    if len(kernels) > 1:
        lines += ["**The GPTQ evaluations were scored with different kernels** (`eval.gptq_kernel: auto` picks by "
                  "GPU generation). Kernels round differently, so a difference of that size is not the tuning's. "
                  "To score them alike, set `eval.gptq_kernel` by name, or rerun them with `--force evaluate`.",
                  ""]
    return lines


def mmlu_heading(runs: dict[str, dict]) -> str:
    """The MMLU heading with the shots the evaluations record, e.g. "MMLU (5-shot)"; each run's
    when they differ (a cached evaluation from before metrics.json recorded them, beside a new one)."""
    shots = {name: m.get("num_shots") for name, m in runs.items()}
    if len(set(shots.values())) == 1:
        return f"MMLU ({shots_label(next(iter(shots.values())))})"
    return "MMLU (" + ", ".join(f"{name}: {shots_label(n)}" for name, n in shots.items()) + ")"


def mmlu_notes(runs: dict[str, dict]) -> list[str]:
    """Below the MMLU table: which categories these are, and whether published (full-MMLU) numbers
    compare with them. Subsets are common here (the default preset scores 2 questions per subject)."""
    lines = [CATEGORY_NOTE, ""]
    subset = next((runs[n] for n in ("expert", *runs) if n in runs and is_mmlu_subset(runs[n])), None)
    if subset is not None:
        lines += [f"Not like-for-like with published MMLU results: {mmlu_subset_note(subset)}.", ""]
    return lines


def mmlu_rows(runs: dict[str, dict]) -> list[dict]:
    names = list(runs)
    categories = sorted({c for m in runs.values() for c in m.get("categories", {})})
    raw = [("average (question-weighted)", {n: runs[n]["average"] for n in names}),
           ("mean over subjects", {n: runs[n]["subject_mean"] for n in names})]
    raw += [(c, {n: runs[n]["categories"].get(c) for n in names}) for c in categories]
    rows = []
    for label, values in raw:
        row = {"": label, **{n: _pct(v) for n, v in values.items()}}
        if {"base", "expert"} <= set(names) and None not in (values["base"], values["expert"]):
            # From the unrounded fractions: 46.84 -> 46.96 is +0.1, not the +0.2 of 46.8 -> 47.0.
            row["change (points)"] = _pct(values["expert"] - values["base"])
        rows.append(row)
    rows.append({"": "questions", **{n: runs[n]["n"] for n in names}})
    return rows


def _flat_rows(values: dict, prefix: str = "") -> list[dict]:
    """Scalars of a (nested) summary as rows, `parent.child` named; lists are left to their own tables."""
    rows = []
    for key, value in values.items():
        if isinstance(value, dict):
            rows += _flat_rows(value, f"{prefix}{key}.")
        elif isinstance(value, (int, float, str, bool)) or value is None:
            rows.append({"": prefix + key, "value": _round(value)})
    return rows


def _round(value):
    return float(f"{value:.4g}") if isinstance(value, float) else value


def _pct(value: float | None) -> float | None:
    return None if value is None else round(100 * value, 1)


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
