"""Metrics of the two benchmarks, computed the way their authors' scripts compute them.

PubMedQA (pubmedqa/evaluation.py): sklearn `accuracy_score` and `f1_score(average="macro")`
called WITHOUT a `labels` argument, so macro-F1 averages over the labels that occur in the
gold answers or the predictions (a label in neither does not count; a gold label never
predicted counts with F1 0). Per-class numbers and the confusion matrix always use the
full label order yes/no/maybe.

MMLU (hendrycks/test evaluate.py): accuracy per subject, per category and overall, where
category and overall accuracies are question-weighted (all correctness flags pooled), as
lm-eval's group accuracy is too; `subject_mean` is the unweighted mean over subjects.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

PUBMEDQA_LABELS = ("yes", "no", "maybe")
MMLU_LETTERS = ("A", "B", "C", "D")
MMLU_CATEGORIES = ("STEM", "humanities", "social sciences", "other")


def pubmedqa_metrics(gold: Sequence[str], pred: Sequence[str]) -> dict:
    """Accuracy, macro-F1, per-class P/R/F1, confusion (rows gold, cols predicted), baseline."""
    gold, pred = list(gold), list(pred)
    _check_same_length(gold, pred)
    labels = list(PUBMEDQA_LABELS)
    precision, recall, f1, support = precision_recall_fscore_support(
        gold, pred, labels=labels, zero_division=0)
    per_class = {
        label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for label, p, r, f, s in zip(labels, precision, recall, f1, support)
    }
    return {
        "benchmark": "pubmedqa",
        "n": len(gold),
        "accuracy": float(accuracy_score(gold, pred)),
        "macro_f1": float(f1_score(gold, pred, average="macro", zero_division=0)),
        "labels": labels,
        "confusion": confusion_matrix(gold, pred, labels=labels).tolist(),
        "per_class": per_class,
        "prediction_counts": {label: pred.count(label) for label in labels},
        "majority_baseline": majority_baseline(gold),
    }


def majority_baseline(gold: Sequence[str]) -> dict:
    """Scores of always answering the most frequent gold label (ties: first in label order)."""
    counts = Counter(gold)
    label = max(PUBMEDQA_LABELS, key=lambda lab: counts.get(lab, 0))
    constant = [label] * len(gold)
    return {
        "label": label,
        "accuracy": float(accuracy_score(gold, constant)),
        "macro_f1": float(f1_score(gold, constant, average="macro", zero_division=0)),
    }


def mmlu_metrics(subjects: Sequence[str], categories: Sequence[str], gold: Sequence[str],
                 pred: Sequence[str]) -> dict:
    """Per-subject/category accuracy, question-weighted average, subject mean, baselines."""
    gold, pred = list(gold), list(pred)
    _check_same_length(gold, pred)
    correct = [g == p for g, p in zip(gold, pred)]
    by_subject: dict[str, list[bool]] = {}
    by_category: dict[str, list[bool]] = {}
    for subject, category, ok in zip(subjects, categories, correct, strict=True):
        by_subject.setdefault(subject, []).append(ok)
        by_category.setdefault(category, []).append(ok)
    subject_acc = {s: _mean(v) for s, v in sorted(by_subject.items())}
    letter_counts = Counter(gold)
    majority = max(MMLU_LETTERS, key=lambda letter: letter_counts.get(letter, 0))
    return {
        "benchmark": "mmlu",
        "n": len(gold),
        "average": _mean(correct),
        "subject_mean": _mean(subject_acc.values()) if subject_acc else 0.0,
        "categories": {c: _mean(by_category[c]) for c in MMLU_CATEGORIES if c in by_category},
        "category_n": {c: len(by_category[c]) for c in MMLU_CATEGORIES if c in by_category},
        "subjects": subject_acc,
        "subject_n": {s: len(v) for s, v in sorted(by_subject.items())},
        "subject_category": dict(sorted(zip(subjects, categories))),
        "chance": 0.25,
        "majority_letter_baseline": {"letter": majority,
                                     "accuracy": letter_counts.get(majority, 0) / max(len(gold), 1)},
        "prediction_counts": {letter: pred.count(letter) for letter in MMLU_LETTERS},
    }


def _mean(values) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else 0.0


def _check_same_length(gold: list, pred: list) -> None:
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold answers but {len(pred)} predictions")
    if not gold:
        raise ValueError("no questions to score")
