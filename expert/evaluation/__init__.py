"""Evaluation: PubMedQA (zero-shot) and MMLU (5-shot) by log-likelihood scoring.

Entry point: `evaluate(config, benchmark, model_dir, data_dir, out_dir, adapter_dir=None,
progress=None)`; it writes metrics.json, predictions, plots and report.md into out_dir.
Submodules: config (EvalConfig), loading (model + adapter), scoring (lm-eval-compatible
log-likelihoods), metrics, report (tables + report.md), plots (mmlu.png).
"""

from expert.evaluation.config import EvalConfig
from expert.evaluation.report import markdown_tables, render_report
from expert.evaluation.runner import evaluate

__all__ = ["EvalConfig", "evaluate", "markdown_tables", "render_report"]
