"""Evaluation: PubMedQA (zero-shot) and MMLU (k-shot, 5 by default) by log-likelihood scoring.

Entry point: `evaluate(config, benchmark, model_dir, data_dir, out_dir, adapter_dir=None,
progress=None)`; it writes metrics.json, predictions, plots and report.md into out_dir.
Submodules: config (EvalConfig), loading (model + adapter), scoring (lm-eval-compatible
log-likelihoods), metrics, report (tables + report.md), plots (mmlu.png).
"""

from expert.evaluation.config import EvalConfig
from expert.evaluation.report import markdown_tables, render_report

__all__ = ["EvalConfig", "evaluate", "markdown_tables", "render_report"]


def __getattr__(name: str):
    # `evaluate` needs torch, transformers and scikit-learn (seconds to import); reading a
    # config (every `expert run`, every cached rerun) needs none of them.
    if name == "evaluate":
        from expert.evaluation.runner import evaluate

        return evaluate
    raise AttributeError(f"module 'expert.evaluation' has no attribute {name!r}")
