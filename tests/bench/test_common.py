"""bench/common.py's round-robin and median, which every multi-round benchmark's figure comes from.

The script tests run one round per side to keep CI short; what several rounds give is checked here.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_rounds_alternate_which_side_goes_first(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from common import alternating_rounds

    order = []

    def run(side: str, round_: int) -> dict:
        order.append((round_, side))
        return {"seconds": float(len(order))}

    runs = alternating_rounds(3, ("peer", "ours"), run)
    assert order == [(0, "peer"), (0, "ours"), (1, "ours"), (1, "peer"), (2, "peer"), (2, "ours")]
    assert runs == {"peer": [{"seconds": 1.0}, {"seconds": 4.0}, {"seconds": 5.0}],
                    "ours": [{"seconds": 2.0}, {"seconds": 3.0}, {"seconds": 6.0}]}


def test_the_median_run_is_one_of_the_runs_the_lower_middle_of_an_even_count(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from common import median_run

    rows = [{"seconds": s, "id": i} for i, s in enumerate((9.0, 2.0, 5.0))]
    assert median_run(rows) == {"seconds": 5.0, "id": 2}
    assert median_run(rows + [{"seconds": 7.0, "id": 3}]) == {"seconds": 5.0, "id": 2}  # not the mean, 6
    assert median_run(rows[:1]) == rows[0]
