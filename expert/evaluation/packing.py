"""How a group's question suffixes are laid out in forward passes after its prefix cache.

A pack is one forward: `height` rows of `width` tokens, each row holding several suffixes
one after the other (each attends to the prefix and causally to itself, see
`forwards.forward_packed`). The attention kernels take a dense mask, so every token of a row
is compared with every token of that row whether the mask hides the pair or not: a suffix
token costs attention over (prefix cache + row width) keys, and the linear layers cost the
same per token however the tokens are arranged. One long row per pack (what EXPERT did until
2026-11-28) made an 8B model's MMLU packs 2,969 tokens wide: attention was 13% of the FLOPs
and a quarter of the GPU's time (bench/README). Several rows of ~ROW_TOKENS keep the matmuls
as large (the same tokens per forward) and cut the attention pairs by more than half (the
full MMLU plan for that model, counted on the CPU: 6.6 G -> 3.0 G pairs; bench/README).

Suffixes go into rows first-fit, longest first, so rows come out nearly full; a suffix longer
than a row gets a wider row of its own (rounded up to `step` when shapes are fixed), and the
widest rows go into packs first, as many as the budget allows. With `fixed` shapes every pack
of a width has the same height (missing rows are filler) so attention kernels that plan per
shape plan a few times per run; otherwise a pack is as high as its rows and as wide as its
fullest row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# Suffix tokens per row, about: each pack's budget is split into round(budget / ROW_TOKENS)
# equal rows. 500-1,000 gave the same estimated GPU time on the MMLU plan (attention against
# the padding that shorter rows leave); a budget under ~1.5 rows keeps one row per pack.
ROW_TOKENS = 768


@dataclass(frozen=True)
class Pack:
    """One forward: `rows[r]` lists the items (indices into the sizes planned) of row r, in order;
    the forward is `height` rows (rows past len(rows) are filler) of `width` tokens."""

    rows: tuple[tuple[int, ...], ...]
    width: int
    height: int


def row_shape(budget: int, row_tokens: int = ROW_TOKENS) -> tuple[int, int]:
    """(rows, width) of a pack of ordinary rows under a `budget` of tokens per forward."""
    height = max(1, round(budget / row_tokens))
    return height, max(1, budget // height)


def plan_packs(sizes: Sequence[int], budget: int, *, fixed: bool, step: int,
               row_tokens: int = ROW_TOKENS) -> list[Pack]:
    """Lay out items of `sizes` tokens in packs of about `budget` tokens (see the module doc)."""
    height, width = row_shape(budget, row_tokens)
    rows: list[list] = []  # [capacity, used, items]; wide rows first, as the longest items come first
    for item in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        n = sizes[item]
        for row in rows:
            if row[1] + n <= row[0]:
                row[1] += n
                row[2].append(item)
                break
        else:
            capacity = width if n <= width else (-(-n // step) * step if fixed else n)
            rows.append([capacity, n, [item]])
    packs, start = [], 0
    while start < len(rows):
        capacity = rows[start][0]
        room = height if capacity <= width else max(1, budget // capacity)
        chunk = rows[start:start + room]
        start += room
        items = tuple(tuple(row[2]) for row in chunk)
        if fixed:
            packs.append(Pack(items, capacity, room))
        else:
            packs.append(Pack(items, max(row[1] for row in chunk), len(chunk)))
    return packs
