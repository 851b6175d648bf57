"""The forward passes of log-likelihood scoring (`scoring.score_questions` plans them).

Three kinds: a group's shared prefix, run once for its KV cache (`prefix_cache`); right-padded
batches, one input per row (`forward_padded`); and packs, several suffixes to a row after that
cache under a block-diagonal mask (`forward_packed`, laid out by `packing.plan_packs`). Each
returns its scores still on the device (`Scored`), and its inputs reach a GPU without the host
waiting for the GPU (`expert.transfer`): the caller reads a forward's scores only once the next one is
queued, so the host prepares each forward while the GPU runs the one before.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from expert.transfer import to_device

if TYPE_CHECKING:
    from expert.evaluation.scoring import Pass


@torch.inference_mode()
def prefix_cache(model, prefix: list[int], device: torch.device, length: int | None = None):
    """The KV cache of `prefix`, `length` slots long: slots past the prefix hold filler tokens
    (they come after every prefix token, so causal attention keeps them out of the prefix's
    values) that the packs mask out."""
    filler = [prefix[-1]] * ((length or len(prefix)) - len(prefix))
    ids = to_device(torch.tensor([prefix + filler], dtype=torch.long), device)
    return model(input_ids=ids, use_cache=True, logits_to_keep=1).cache


@dataclass(frozen=True)
class PackShape:
    """prefix: real prefix tokens; cached: slots in the prefix cache (prefix + masked filler);
    width, height: the pack's rows and their tokens (planned by `packing.plan_packs`)."""

    prefix: int
    cached: int
    width: int
    height: int


class Scored:
    """A forward's scores, still on the device until `read`: values[j] is the log-prob of the
    j-th target token, in the order of `passes`, their choices and their tokens (counts[i][c]
    tokens for pass i's choice c)."""

    def __init__(self, passes: list[Pass], values: torch.Tensor, counts: list[list[int]]):
        self.passes, self.values, self.counts = passes, values, counts

    def read(self) -> list[list[float]]:
        """Summed log-probs of each pass's targets (one transfer to the host for the forward)."""
        values, out, at = self.values.tolist(), [], 0
        for entry in self.counts:
            sums = []
            for count in entry:
                sums.append(math.fsum(values[at:at + count]))
                at += count
            out.append(sums)
        return out


def scored(passes: list[Pass], logits: torch.Tensor, picks: list[list[tuple[list[int], list[int]]]]) -> Scored:
    """Log-probs of the picked tokens: picks[i][c] = (rows of `logits` [n, vocab] that score
    pass i's choice c, its tokens). Only the rows picked are log-softmaxed. The indices go where
    the logits are: the output head's device, which is the inputs' only while the model is on one."""
    order: dict[int, int] = {}  # row of `logits` -> its row among those scored
    rows, ids = [], []
    for entry in picks:
        for positions, target in entry:
            rows.extend(order.setdefault(i, len(order)) for i in positions)
            ids.extend(target)
    kept = logits[to_device(torch.tensor(list(order), dtype=torch.long), logits.device)]
    logprobs = torch.log_softmax(kept.float(), dim=-1)
    index = to_device(torch.tensor([rows, ids], dtype=torch.long), logprobs.device)
    return Scored(passes, logprobs[index[0], index[1]], [[len(target) for _, target in entry] for entry in picks])


def expand_cache(cache, batch: int):
    """A private copy of the prefix cache repeated over the batch (the forward appends to it)."""
    fresh = copy.deepcopy(cache)
    if batch > 1:
        fresh.batch_repeat_interleave(batch)
    return fresh


@torch.inference_mode()
def forward_padded(model, passes: list[Pass], inputs: list[list[int]], device: torch.device, cache=None) -> Scored:
    """Right-padded batch forward of `inputs` (the passes' tokens after any cached prefix).

    Right padding needs no attention mask: causal attention never lets a real token see
    the pads after it (lm-eval relies on the same fact).
    """
    width = max(len(t) for t in inputs)
    ids = torch.zeros((len(inputs), width), dtype=torch.long)
    for row, tokens in enumerate(inputs):
        ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    first = min(len(t) - p.span for t, p in zip(inputs, passes))
    keep = width - first
    out = model(input_ids=to_device(ids, device), cache=cache, use_cache=cache is not None,
                logits_to_keep=keep)
    width_kept = out.logits.shape[1]
    # The kept block spans every input's scored positions, so it also holds each shorter input's
    # pads and each longer one's context: log-softmax only the rows scored (a PubMedQA batch of 8
    # keeps ~20 positions a row and scores one). Row by row, the same numbers.
    picks = []
    for row, (tokens, p) in enumerate(zip(inputs, passes)):
        end = row * width_kept + len(tokens) - first  # just past this input's last kept position
        picks.append([(list(range(end - len(target), end)), target) for _, target in p.targets])
    return scored(passes, out.logits.reshape(-1, out.logits.shape[-1]), picks)


def mask_kind(model) -> str | None:
    """How a custom 4D attention mask must look for this model's attention: SDPA takes a boolean
    mask (True: attend), eager attention an additive float one. Other kernels (flash-attention,
    flex) take no dense mask, and their questions run padded and batched instead."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    kind = getattr(config, "_attn_implementation", None)
    return {"sdpa": "bool", "eager": "float"}.get(kind)


@torch.inference_mode()
def forward_packed(model, rows: list[list[Pass]], shape: PackShape, cache, kind: str,
                   device: torch.device) -> Scored:
    """Every row of the pack: its passes' suffixes one after the other, after the shared
    prefix's cache.

    Each suffix attends to the whole prefix and causally to itself only (a block-diagonal
    mask per row), and its positions restart after the prefix, so every suffix sees what it
    would see alone; logits are built only at the scored positions. Against a padded batch of
    one suffix per row this needs far fewer copies of the prefix cache (a batch of 64 rows of
    an 8B model's 5-shot prefix is GiBs of copying) and no padding. A row shorter than
    `shape.width` ends in a filler segment, and rows past the pack's own are all filler:
    filler attends to the prefix and itself like any suffix, is never scored, and sits at the
    first suffix position (a long filler must not run past the model's positions). The
    cache's slots past `shape.prefix` are masked out for every token.
    """
    prefix, width, height = shape.prefix, shape.width, shape.height
    ids, segments, local = [], [], []
    placed: list[tuple[Pass, int, int]] = []  # (pass, its row, the column just past its suffix)
    for r in range(height):
        row_ids, row_segments, row_local = [], [], []
        for s, p in enumerate(rows[r] if r < len(rows) else ()):
            suffix = p.tokens[prefix:]
            row_ids += suffix
            row_segments += [s] * len(suffix)
            row_local += range(len(suffix))
            placed.append((p, r, len(row_ids)))
        fill = width - len(row_ids)
        ids.append(row_ids + [0] * fill)
        segments.append(row_segments + [-1] * fill)
        local.append(row_local + [0] * fill)
    seg = to_device(torch.tensor(segments), device)
    causal = torch.ones((width, width), dtype=torch.bool, device=device).tril()
    allowed = (seg[:, :, None] == seg[:, None, :]) & causal
    seen = torch.arange(shape.cached, device=device) < prefix  # filler slots of the cache: never
    allowed = torch.cat([seen.expand(height, width, shape.cached), allowed], dim=2)[:, None]
    if kind == "bool":  # see mask_kind
        mask = allowed
    else:
        dtype = getattr(model, "dtype", torch.float32)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    # Logits at the scored columns of any row (the model keeps the same positions in every row);
    # row r's column c is row r * len(columns) + where[c] of the kept logits.
    columns = sorted({c for p, _, end in placed for c in range(end - p.span, end)})
    where = {c: k for k, c in enumerate(columns)}
    picks = [[([r * len(columns) + where[c] for c in range(end - len(target), end)], target) for _, target in p.targets]
             for p, r, end in placed]
    # The forward appends the pack to the cache it is given: it gets a copy per row.
    out = model(input_ids=to_device(torch.tensor(ids), device),
                position_ids=to_device(torch.tensor(local) + prefix, device), attention_mask=mask,
                cache=expand_cache(cache, height), use_cache=True,
                logits_to_keep=to_device(torch.tensor(columns, dtype=torch.long), device))
    return scored([p for p, _, _ in placed], out.logits.reshape(-1, out.logits.shape[-1]), picks)
