"""Log-likelihood scoring of multiple-choice questions, the lm-evaluation-harness way.

A question is a context (the prompt) and choices (continuations such as " yes" or " A").
Each choice's score is the summed log-probability of its tokens after the context.

Tokenization follows lm-eval's `_encode_pair`: trailing whitespace of the context moves
into the continuation, context+continuation is encoded as one string and split at the
length of the encoded context, and the tokenizer's own defaults decide about a BOS token
(none is added where the tokenizer adds none). Inputs longer than the context window
lose tokens from the left, as lm-eval's `(ctx + cont)[-(max_length + 1):][:-1]`.

Speed, without changing what is computed:
- when every choice of a question is one token (MMLU letters, PubMedQA yes/no/maybe on
  most tokenizers) the context shares all of its tokens across choices, so ONE forward
  pass scores all of them from the last position's log-probs;
- passes are sorted by length and padded on the right only to their batch's longest;
- `logits_to_keep` asks the model for the last few positions' logits only;
- questions that share a prompt prefix (an MMLU subject's 5 shots) can run that prefix
  once and reuse its KV cache. The cached prefix is the longest common *token* prefix of
  the group's encoded inputs, so prefix + suffix tokens are exactly the uncached tokens
  (splitting the text at the prefix would not be: "\\n\\n" encodes as one token at the end
  of a string and as two before a question). Their suffixes then run packed, several to a
  row and several rows to a forward after that cache (`packing.plan_packs`,
  `forwards.forward_packed`), where the attention kernel takes a mask (SDPA, eager); other
  kernels get right-padded batches with the cache copied per row. On a GPU the packs of a
  row width all have the same height and every prefix cache is padded to a multiple of
  SHAPE_STEP with masked-out slots (`fixed_shapes`): attention kernels that plan per shape
  (cuDNN's, which PyTorch picks on an H100) then plan a few times per run instead of once
  per pack;
- a forward's scores are read (the host waiting for the GPU) only once the next forward is
  queued (`IN_FLIGHT`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from expert.evaluation import forwards
from expert.evaluation.packing import ROW_TOKENS, plan_packs

# A shared prefix shorter than this is not worth a separate forward pass.
MIN_PREFIX_TOKENS = 16
# Prefix caches (and packs longer than the pack budget) are padded to a multiple of this
# when shapes are fixed: a few distinct attention shapes in a whole MMLU run.
SHAPE_STEP = 256
# Forwards queued before the oldest one's scores are read (0: each read as soon as it is queued).
IN_FLIGHT = 1


@dataclass(frozen=True)
class Question:
    """Encoded question: lm-eval's context_enc and each choice's continuation_enc."""

    context: list[int]
    choices: list[list[int]]


@dataclass
class Pass:
    """One model input: its tokens and the choices scored on its last positions."""

    question: int
    tokens: list[int]
    targets: list[tuple[int, list[int]]]  # (choice index, tokens scored at the end)
    truncated: bool

    @property
    def span(self) -> int:
        return max(len(target) for _, target in self.targets)


def encode_questions(tokenizer, contexts: Sequence[str], choices: Sequence[Sequence[str]]) -> list[Question]:
    """Encode (context, continuations) like lm-eval's `_encode_pair` for a causal LM."""
    ctxs, wholes, owner = [], [], []
    for i, (context, conts) in enumerate(zip(contexts, choices, strict=True)):
        if not context:
            raise ValueError(f"question {i} has an empty prompt; every prompt must end with 'Answer:'")
        stripped = context.rstrip()
        moved = context[len(stripped):]  # trailing whitespace belongs to the continuation
        ctxs.append(stripped)
        for cont in conts:
            wholes.append(stripped + moved + cont)
            owner.append(i)
    ctx_ids, whole_ids = _encode(tokenizer, ctxs), _encode(tokenizer, wholes)
    split: list[list[list[int]]] = [[] for _ in ctxs]
    for i, whole in zip(owner, whole_ids):
        split[i].append(whole[len(ctx_ids[i]):])
    for i, conts in enumerate(split):
        if any(not cont for cont in conts):
            raise ValueError(f"question {i}: a choice encodes to no tokens after its context")
    return [Question(context=c, choices=s) for c, s in zip(ctx_ids, split)]


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Tokenizer defaults, except no special tokens for text that already starts with BOS."""
    bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    bos = tokenizer.decode(bos_id) if bos_id is not None else None
    plain = [i for i, t in enumerate(texts) if not (bos and t.startswith(bos))]
    out: list[list[int]] = [[] for _ in texts]
    for idx, special in ((plain, {}), (sorted(set(range(len(texts))) - set(plain)), {"add_special_tokens": False})):
        if idx:
            ids = tokenizer([texts[i] for i in idx], **special)["input_ids"]
            for i, row in zip(idx, ids):
                out[i] = list(row)
    return out


def model_max_length(model, tokenizer, default: int = 2048) -> int:
    """The context window lm-eval would use: config attributes, then tokenizer, then 2048."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if value is not None:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit is not None and limit < 10**12 else default


def one_pass(question: Question) -> bool:
    return all(len(choice) == 1 for choice in question.choices)


def _make_passes(index: int, question: Question, max_length: int) -> list[Pass]:
    ctx = question.context
    if one_pass(question):
        targets = [(c, choice) for c, choice in enumerate(question.choices)]
        return [Pass(index, ctx[-max_length:], targets, len(ctx) > max_length)]
    passes = []
    for c, cont in enumerate(question.choices):
        full = ctx + cont
        passes.append(Pass(index, full[-(max_length + 1):][:-1], [(c, cont)], len(full) > max_length + 1))
    return passes


def score_questions(model, questions: Sequence[Question], *, max_length: int, batch_size: int = 8,
                    groups: Sequence[Sequence[int]] | None = None,
                    on_question_done: Callable[[int, list[float]], None] | None = None,
                    fixed_shapes: bool | None = None) -> list[list[float]]:
    """Log-likelihood of every choice of every question: result[q][c].

    `groups` lists questions that share a prompt prefix; each group's longest common token
    prefix is run once and its KV cache reused (None: no prefix caching); every group is planned
    and batched on its own, so a group scored alone gets the scores it gets among the others.
    `on_question_done(q, result[q])` as each question's last choice is scored. `fixed_shapes` pads
    packs and prefix caches to a few shapes, with the padding masked out (None: on a GPU).
    The scores do not change: padded slots are never attended to and never scored.
    """
    passes = [p for i, q in enumerate(questions) for p in _make_passes(i, q, max_length)]
    scores = [[math.nan] * len(q.choices) for q in questions]
    left = [0] * len(questions)
    for p in passes:
        left[p.question] += 1
    device = next(model.parameters()).device

    def record(p: Pass, values: list[float]) -> None:
        for (choice, _), value in zip(p.targets, values):
            scores[p.question][choice] = value
        left[p.question] -= 1
        if left[p.question] == 0 and on_question_done is not None:
            on_question_done(p.question, scores[p.question])

    mask_kind = forwards.mask_kind(model)
    if fixed_shapes is None:
        fixed_shapes = device.type == "cuda"
    budget = pack_tokens(model)
    in_flight: list[forwards.Scored] = []

    def finish(scored: forwards.Scored) -> None:
        for p, values in zip(scored.passes, scored.read()):
            record(p, values)

    def launched(scored: forwards.Scored) -> None:
        # The host reads a forward's scores (a wait for the GPU) only once the next forward is
        # queued behind it, so the GPU never idles while the host prepares a pack.
        in_flight.append(scored)
        while len(in_flight) > IN_FLIGHT:
            finish(in_flight.pop(0))

    for prefix, members in _plan(passes, groups):
        packed = bool(prefix) and mask_kind is not None
        # Only packs can mask out a padded prefix cache; padded batches need it exact.
        # Never past the context window: a model with learned positions has no slot beyond it.
        cached = min(_round_up(len(prefix), SHAPE_STEP), max_length) if packed and fixed_shapes else len(prefix)
        cache = forwards.prefix_cache(model, prefix, device, cached) if prefix else None
        members.sort(key=lambda p: (-len(p.tokens), p.tokens))
        if packed:
            sizes = [len(p.tokens) - len(prefix) for p in members]
            for pack in plan_packs(sizes, budget, fixed=fixed_shapes, step=SHAPE_STEP, row_tokens=ROW_TOKENS):
                rows = [[members[i] for i in row] for row in pack.rows]
                shape = forwards.PackShape(len(prefix), cached, pack.width, pack.height)
                launched(forwards.forward_packed(model, rows, shape, cache, mask_kind, device))
            continue
        for start in range(0, len(members), batch_size):
            batch = members[start:start + batch_size]
            suffixes = [p.tokens[len(prefix):] for p in batch]
            batch_cache = forwards.expand_cache(cache, len(batch)) if cache is not None else None
            launched(forwards.forward_padded(model, batch, suffixes, device, batch_cache))
    for scored in in_flight:
        finish(scored)
    return scores


def pack_tokens(model) -> int:
    """Suffix tokens per packed forward.

    Bigger packs keep a GPU's matrix units busy. What bounds them is the dense attention mask:
    each token is compared with every other token of its row, and the masked-out pairs are
    wasted work, about 2 * B * hidden * layers FLOPs per token for a row of B tokens against
    ~2 * N for the linear layers. B = (4 * hidden + 3 * intermediate) / 20 keeps that waste near
    10% in a pack of one row (about 3,000 tokens for an 8B Llama, 350 for SmolLM2-135M); a
    pack of several rows (`packing.row_shape`) wastes less for the same tokens per forward.
    """
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    hidden = getattr(config, "hidden_size", None)
    if not hidden:
        return 1024
    inter = getattr(config, "intermediate_size", None) or 4 * hidden
    return int(min(4096, max(256, (4 * hidden + 3 * inter) // 20)))


def _plan(passes: list[Pass], groups: Sequence[Sequence[int]] | None) -> list[tuple[list[int], list[Pass]]]:
    """Split passes into (shared prefix tokens, passes) runs; an empty prefix means no cache."""
    if groups is None:
        return [([], passes)]
    by_question: dict[int, list[Pass]] = {}
    for p in passes:
        by_question.setdefault(p.question, []).append(p)
    runs, grouped = [], set()
    for group in groups:
        members = [p for q in group for p in by_question.get(q, [])]
        grouped.update(group)
        cacheable = [p for p in members if not p.truncated]
        # Truncated inputs start mid-prefix: they run uncached, on their own.
        rest = [p for p in members if p.truncated]
        prefix = _common_prefix(cacheable)
        if len(prefix) >= MIN_PREFIX_TOKENS:
            runs.append((prefix, cacheable))
        else:
            rest = members
        if rest:
            runs.append(([], rest))
    ungrouped = [p for p in passes if p.question not in grouped]
    if ungrouped:
        runs.append(([], ungrouped))
    return runs


def _common_prefix(passes: list[Pass]) -> list[int]:
    """Longest common token prefix that leaves every scored position in the suffix."""
    if not passes:
        return []
    prefix = os.path.commonprefix([p.tokens for p in passes])
    room = min(len(p.tokens) - p.span for p in passes)
    return list(prefix[:max(room, 0)])


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step
