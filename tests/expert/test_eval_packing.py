"""Pack layout of scoring (`expert.evaluation.packing`): which suffixes share a forward, and its shape."""

import pytest

from expert.evaluation.packing import Pack, plan_packs, row_shape


@pytest.mark.parametrize("budget, row_tokens, shape", [
    (2969, 768, (4, 742)),  # an 8B Llama's pack budget: four rows
    (345, 768, (1, 345)),  # SmolLM2-135M's: one row, as before rows existed
    (1100, 768, (1, 1100)),  # under 1.5 rows: still one
    (1200, 768, (2, 600)),
    (100, 30, (3, 33)),
])
def test_row_shape_splits_the_budget_into_equal_rows(budget, row_tokens, shape):
    assert row_shape(budget, row_tokens) == shape


def layout(sizes, packs):
    return [[[sizes[i] for i in row] for row in pack.rows] for pack in packs]


@pytest.mark.parametrize("fixed", [False, True])
def test_rows_are_filled_first_fit_longest_first(fixed):
    sizes = [3, 5, 2, 5, 3, 5, 1]
    packs = plan_packs(sizes, budget=16, fixed=fixed, step=4, row_tokens=8)  # two rows of 8
    # Greedy in the given order would give [3,5], [2,5], [3,5], [1]: four rows, not three.
    assert layout(sizes, packs) == [[[5, 3], [5, 3]], [[5, 2, 1]]]
    assert [(p.width, p.height) for p in packs] == ([(8, 2), (8, 2)] if fixed else [(8, 2), (8, 1)])
    assert sorted(i for p in packs for row in p.rows for i in row) == list(range(len(sizes)))


def test_equal_sizes_keep_their_order():
    # Ties go in the order given (the scorer sorts its passes deterministically first).
    packs = plan_packs([4, 4, 4, 4], budget=8, fixed=False, step=4, row_tokens=8)
    assert [p.rows for p in packs] == [((0, 1),), ((2, 3),)]


def test_a_suffix_wider_than_a_row_gets_a_wider_row_of_its_own():
    sizes = [2, 11, 3, 9, 2]
    exact = plan_packs(sizes, budget=24, fixed=False, step=4, row_tokens=8)  # three rows of 8
    # Wide rows come first, as many to a pack as the budget holds (24 // 11 = 2); the short
    # suffixes never go into them here because first-fit found the wide rows full.
    assert layout(sizes, exact) == [[[11], [9]], [[3, 2, 2]]]
    assert [(p.width, p.height) for p in exact] == [(11, 2), (7, 1)]
    fixed = plan_packs(sizes, budget=24, fixed=True, step=4, row_tokens=8)
    # Fixed shapes round a wide row up to the step (12): there is room in it for what follows.
    assert layout(sizes, fixed) == [[[11], [9, 3]], [[2, 2]]]
    assert [(p.width, p.height) for p in fixed] == [(12, 2), (8, 3)]


def test_a_suffix_longer_than_the_budget_still_runs():
    packs = plan_packs([30, 4], budget=16, fixed=True, step=8, row_tokens=8)
    assert packs == [Pack(((0,),), 32, 1), Pack(((1,),), 8, 2)]


def test_fixed_shapes_give_few_distinct_shapes():
    # Like a long MMLU subject: hundreds of suffixes of 20-300 tokens, a few longer than a row.
    sizes = [20 + (i * 37) % 280 for i in range(600)] + [800, 900, 1000]
    packs = plan_packs(sizes, budget=2969, fixed=True, step=256, row_tokens=768)
    assert {(p.width, p.height) for p in packs} == {(1024, 2), (742, 4)}
    assert all(sum(sizes[i] for i in row) <= p.width for p in packs for row in p.rows)
    assert sorted(i for p in packs for row in p.rows for i in row) == list(range(len(sizes)))
    # First-fit leaves little room: over 98% of the tokens run are real; the wide pack that
    # takes an ordinary row along (padded to 1024) and the last pack are the least full.
    fill = [sum(sizes[i] for row in p.rows for i in row) / (p.width * p.height) for p in packs]
    assert sum(sizes) / sum(p.width * p.height for p in packs) > 0.98
    assert min(fill[2:-1]) > 0.98 and fill[1] > 0.85, fill
