"""Checkpoint selection: the best dev score wins, ties go to the earlier step."""

import pytest

from expert.select import pick_best


def rows(*triples):
    return [{"step": s, "accuracy": a, "macro_f1": f, "dev_loss": l} for s, a, f, l in triples]


@pytest.mark.parametrize("metric, expected", [("accuracy", 20), ("macro_f1", 30), ("dev_loss", 10)])
def test_pick_best_by_metric(metric, expected):
    table = rows((10, 0.5, 0.3, 0.9), (20, 0.7, 0.4, 1.0), (30, 0.6, 0.5, 1.1))
    assert pick_best(table, metric)["step"] == expected


@pytest.mark.parametrize("metric", ["accuracy", "dev_loss"])
def test_ties_go_to_the_earlier_step_whatever_the_order(metric):
    table = rows((30, 0.7, 0.4, 0.8), (10, 0.7, 0.4, 0.8), (20, 0.6, 0.3, 0.9))
    assert pick_best(table, metric)["step"] == 10
