"""Metrics against numbers computed by hand on hand-made predictions."""

import pytest

from expert.evaluation.metrics import mmlu_metrics, pubmedqa_metrics

# gold yes,yes,yes,no,no,maybe; "maybe" is never predicted.
GOLD = ["yes", "yes", "yes", "no", "no", "maybe"]
PRED = ["yes", "yes", "no", "no", "yes", "yes"]


def test_pubmedqa_by_hand():
    m = pubmedqa_metrics(GOLD, PRED)
    assert m["n"] == 6
    assert m["accuracy"] == pytest.approx(3 / 6)
    # yes: P 2/4, R 2/3, F1 4/7; no: P 1/2, R 1/2, F1 1/2; maybe: 0 -> macro (4/7 + 1/2 + 0) / 3
    assert m["macro_f1"] == pytest.approx(5 / 14)
    assert m["per_class"]["yes"] == pytest.approx({"precision": 0.5, "recall": 2 / 3, "f1": 4 / 7, "support": 3})
    assert m["per_class"]["no"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert m["per_class"]["maybe"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["confusion"] == [[2, 1, 0], [1, 1, 0], [1, 0, 0]]  # rows gold, cols predicted, yes/no/maybe
    assert m["prediction_counts"] == {"yes": 4, "no": 2, "maybe": 0}
    # Always "yes": accuracy 3/6; F1 yes 2/3, no 0, maybe 0 over the 3 gold labels.
    assert m["majority_baseline"] == pytest.approx({"label": "yes", "accuracy": 0.5, "macro_f1": 2 / 9})


def test_macro_f1_averages_over_labels_present_like_the_authors_script():
    # "maybe" is neither gold nor predicted: sklearn without `labels` leaves it out (2/3),
    # averaging over all three labels would give 4/9.
    m = pubmedqa_metrics(["yes", "no", "yes"], ["yes", "no", "no"])
    assert m["macro_f1"] == pytest.approx(2 / 3)


def test_pubmedqa_rejects_length_mismatch():
    with pytest.raises(ValueError, match="3 gold answers but 2 predictions"):
        pubmedqa_metrics(["yes", "no", "yes"], ["yes", "no"])


def test_mmlu_by_hand():
    subjects = ["bio", "bio", "law", "law", "law", "law"]
    categories = ["STEM", "STEM", "humanities", "humanities", "humanities", "humanities"]
    gold = ["A", "B", "C", "C", "D", "C"]
    pred = ["A", "B", "C", "A", "A", "A"]
    m = mmlu_metrics(subjects, categories, gold, pred)
    assert m["n"] == 6
    assert m["subjects"] == {"bio": 1.0, "law": 0.25}
    assert m["average"] == pytest.approx(3 / 6)  # question-weighted
    assert m["subject_mean"] == pytest.approx((1.0 + 0.25) / 2)
    assert m["categories"] == {"STEM": 1.0, "humanities": 0.25}
    assert m["category_n"] == {"STEM": 2, "humanities": 4}
    assert m["chance"] == 0.25
    assert m["majority_letter_baseline"] == {"letter": "C", "accuracy": 3 / 6}
    assert m["prediction_counts"] == {"A": 4, "B": 1, "C": 1, "D": 0}
