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
  sequence after one copy of that cache (`_forward_packed`), where the attention kernel
  takes a mask (SDPA, eager); other kernels get right-padded batches with the cache copied
  per row. On a GPU every pack is padded to the same length and every prefix cache to a
  multiple of SHAPE_STEP with masked-out slots (`fixed_shapes`): attention kernels that plan
  per shape (cuDNN's, which PyTorch picks on an H100) then plan a few times per run instead of
  once per pack.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

# A shared prefix shorter than this is not worth a separate forward pass.
MIN_PREFIX_TOKENS = 16
# Prefix caches (and packs longer than the pack budget) are padded to a multiple of this
# when shapes are fixed: a few distinct attention shapes in a whole MMLU run.
SHAPE_STEP = 256


@dataclass(frozen=True)
class Question:
    """Encoded question: lm-eval's context_enc and each choice's continuation_enc."""

    context: list[int]
    choices: list[list[int]]


@dataclass
class _Pass:
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


def _make_passes(index: int, question: Question, max_length: int) -> list[_Pass]:
    ctx = question.context
    if one_pass(question):
        targets = [(c, choice) for c, choice in enumerate(question.choices)]
        return [_Pass(index, ctx[-max_length:], targets, len(ctx) > max_length)]
    passes = []
    for c, cont in enumerate(question.choices):
        full = ctx + cont
        passes.append(_Pass(index, full[-(max_length + 1):][:-1], [(c, cont)], len(full) > max_length + 1))
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

    def record(p: _Pass, values: list[float]) -> None:
        for (choice, _), value in zip(p.targets, values):
            scores[p.question][choice] = value
        left[p.question] -= 1
        if left[p.question] == 0 and on_question_done is not None:
            on_question_done(p.question, scores[p.question])

    mask_kind = _mask_kind(model)
    if fixed_shapes is None:
        fixed_shapes = device.type == "cuda"
    budget = pack_tokens(model)
    for prefix, members in _plan(passes, groups):
        packed = bool(prefix) and mask_kind is not None
        # Only packs can mask out a padded prefix cache; padded batches need it exact.
        # Never past the context window: a model with learned positions has no slot beyond it.
        cached = min(_round_up(len(prefix), SHAPE_STEP), max_length) if packed and fixed_shapes else len(prefix)
        cache = _prefix_cache(model, prefix, device, cached) if prefix else None
        members.sort(key=lambda p: (-len(p.tokens), p.tokens))
        if packed:
            shape = _PackShape(len(prefix), cached, budget if fixed_shapes else 0)
            for chunk in _packs(members, len(prefix), budget):
                for p, values in zip(chunk, _forward_packed(model, chunk, shape, cache, mask_kind, device)):
                    record(p, values)
            continue
        for start in range(0, len(members), batch_size):
            batch = members[start:start + batch_size]
            suffixes = [p.tokens[len(prefix):] for p in batch]
            batch_cache = _expand(cache, len(batch)) if cache is not None else None
            for p, values in zip(batch, _forward(model, suffixes, [p.targets for p in batch], device, batch_cache)):
                record(p, values)
    return scores


def pack_tokens(model) -> int:
    """Suffix tokens per packed forward.

    A pack's attention mask is dense: each token is compared with every other suffix token of
    the pack and the masked-out pairs are wasted work, about 2 * B * hidden * layers FLOPs per
    token against ~2 * N for the linear layers. B = (4 * hidden + 3 * intermediate) / 20 keeps
    that waste near 10% (about 3,000 tokens for an 8B Llama, 350 for SmolLM2-135M); bigger
    packs keep a GPU's matrix units busy, so the bound, not a batch count, sets the size.
    """
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    hidden = getattr(config, "hidden_size", None)
    if not hidden:
        return 1024
    inter = getattr(config, "intermediate_size", None) or 4 * hidden
    return int(min(4096, max(256, (4 * hidden + 3 * inter) // 20)))


def _packs(members: list[_Pass], prefix: int, budget: int) -> list[list[_Pass]]:
    """Consecutive runs of passes whose suffixes add up to at most `budget` tokens (one pass may exceed it)."""
    packs, current, size = [], [], 0
    for p in members:
        n = len(p.tokens) - prefix
        if current and size + n > budget:
            packs.append(current)
            current, size = [], 0
        current.append(p)
        size += n
    if current:
        packs.append(current)
    return packs


def _plan(passes: list[_Pass], groups: Sequence[Sequence[int]] | None) -> list[tuple[list[int], list[_Pass]]]:
    """Split passes into (shared prefix tokens, passes) runs; an empty prefix means no cache."""
    if groups is None:
        return [([], passes)]
    by_question: dict[int, list[_Pass]] = {}
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


def _common_prefix(passes: list[_Pass]) -> list[int]:
    """Longest common token prefix that leaves every scored position in the suffix."""
    if not passes:
        return []
    prefix = os.path.commonprefix([p.tokens for p in passes])
    room = min(len(p.tokens) - p.span for p in passes)
    return list(prefix[:max(room, 0)])


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


@torch.inference_mode()
def _prefix_cache(model, prefix: list[int], device: torch.device, length: int | None = None):
    """The KV cache of `prefix`, `length` slots long: slots past the prefix hold filler tokens
    (they come after every prefix token, so causal attention keeps them out of the prefix's
    values) that the packs mask out."""
    filler = [prefix[-1]] * ((length or len(prefix)) - len(prefix))
    ids = torch.tensor([prefix + filler], dtype=torch.long, device=device)
    return model(input_ids=ids, use_cache=True, logits_to_keep=1).cache


@dataclass(frozen=True)
class _PackShape:
    """prefix: real prefix tokens; cached: slots in the prefix cache (prefix + masked filler);
    length: the pack's padded length (0: no padding; longer packs round up to SHAPE_STEP)."""

    prefix: int
    cached: int
    length: int = 0


def _expand(cache, batch: int):
    """A private copy of the prefix cache repeated over the batch (the forward appends to it)."""
    fresh = copy.deepcopy(cache)
    if batch > 1:
        fresh.batch_repeat_interleave(batch)
    return fresh


@torch.inference_mode()
def _forward(model, inputs: list[list[int]], targets: list[list[tuple[int, list[int]]]],
             device: torch.device, cache=None) -> list[list[float]]:
    """Right-padded batch forward; summed log-probs of each input's targets.

    Right padding needs no attention mask: causal attention never lets a real token see
    the pads after it (lm-eval relies on the same fact).
    """
    width = max(len(t) for t in inputs)
    ids = torch.zeros((len(inputs), width), dtype=torch.long)
    for row, tokens in enumerate(inputs):
        ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    spans = [max(len(t) for _, t in row) for row in targets]
    first = min(len(t) - s for t, s in zip(inputs, spans))
    keep = width - first
    out = model(input_ids=ids.to(device), cache=cache, use_cache=cache is not None,
                logits_to_keep=keep)
    width_kept = out.logits.shape[1]
    # The kept block spans every input's scored positions, so it also holds each shorter input's
    # pads and each longer one's context: log-softmax only the rows scored (a PubMedQA batch of 8
    # keeps ~20 positions a row and scores one). Row by row, the same numbers.
    rows: dict[int, int] = {}  # flat row of the kept logits -> its row among those scored
    wanted = []  # per input, per choice: (rows among those scored, target token ids)
    for row, (tokens, row_targets) in enumerate(zip(inputs, targets)):
        end = row * width_kept + len(tokens) - first  # just past this input's last kept position
        wanted.append([([rows.setdefault(i, len(rows)) for i in range(end - len(target), end)], target)
                       for _, target in row_targets])
    scored = out.logits.reshape(-1, out.logits.shape[-1])[torch.tensor(list(rows), device=out.logits.device)]
    return _pick(torch.log_softmax(scored.float(), dim=-1), wanted)


def _pick(logprobs: torch.Tensor, wanted: list[list[tuple[Sequence[int], list[int]]]]) -> list[list[float]]:
    """Summed log-probs of each target: wanted[i][c] = (the logit rows that score it, its tokens).

    One gather and one transfer to the host for the whole forward; reading each value with
    float() would wait for the GPU once per choice.
    """
    rows, ids = [], []
    for entry in wanted:
        for positions, target in entry:
            rows.extend(positions)
            ids.extend(target)
    index = torch.tensor(rows, device=logprobs.device)
    values = logprobs[index, torch.tensor(ids, device=logprobs.device)].tolist()
    out, at = [], 0
    for entry in wanted:
        sums = []
        for _, target in entry:
            sums.append(math.fsum(values[at:at + len(target)]))
            at += len(target)
        out.append(sums)
    return out


def _mask_kind(model) -> str | None:
    """How a custom 4D attention mask must look for this model's attention: SDPA takes a boolean
    mask (True: attend), eager attention an additive float one. Other kernels (flash-attention,
    flex) take no dense mask, and their questions run padded and batched instead."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    kind = getattr(config, "_attn_implementation", None)
    return {"sdpa": "bool", "eager": "float"}.get(kind)


@torch.inference_mode()
def _forward_packed(model, passes: list[_Pass], shape: _PackShape, cache, mask_kind: str,
                    device: torch.device) -> list[list[float]]:
    """All passes' suffixes as ONE sequence after the shared prefix's cache.

    Each suffix attends to the whole prefix and causally to itself only (a block-diagonal
    mask), and its positions restart after the prefix, so every suffix sees what it would see
    alone; logits are built only at the scored positions. Against a padded batch this needs no
    copy of the prefix cache per row (a batch of 64 rows of an 8B model's 5-shot prefix is
    GiBs of copying) and no padding. With `shape.length` the pack is filled up with one more
    segment of filler tokens, attending to the prefix and itself like any suffix, never scored,
    all at the first suffix position (a long filler must not run past the model's positions);
    the cache's filler slots past `shape.prefix` are masked out for every token.
    """
    prefix = shape.prefix
    suffixes = [p.tokens[prefix:] for p in passes]
    real = sum(len(t) for t in suffixes)
    if not shape.length:
        total = real
    else:  # one pass longer than the budget makes a longer pack: rounded, it rarely adds a shape
        total = shape.length if real <= shape.length else _round_up(real, SHAPE_STEP)
    segments = suffixes + ([[0] * (total - real)] if total > real else [])
    lengths = torch.tensor([len(t) for t in segments], device=device)
    ids = torch.tensor([t for s in segments for t in s], dtype=torch.long, device=device)[None]
    segment = torch.repeat_interleave(torch.arange(len(segments), device=device), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    local = torch.arange(total, device=device) - starts[segment]
    local[real:] = 0  # any valid position does for the filler; the first suffix position is one
    position = torch.arange(total, device=device)
    allowed = (segment[:, None] == segment[None, :]) & (position[None, :] <= position[:, None])
    seen = torch.arange(shape.cached, device=device) < prefix  # filler slots of the cache: never
    allowed = torch.cat([seen.expand(total, shape.cached), allowed], dim=1)
    if mask_kind == "bool":
        mask = allowed[None, None]
    else:
        dtype = getattr(model, "dtype", torch.float32)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        mask = mask[None, None]
    keep: dict[int, int] = {}  # packed position -> its row in the kept logits (choices share rows)
    wanted, end = [], 0
    for suffix, p in zip(suffixes, passes):
        end += len(suffix)
        wanted.append([([keep.setdefault(i, len(keep)) for i in range(end - len(target), end)], target)
                       for _, target in p.targets])
    # The forward appends the pack to the cache it is given: it gets a copy (one row, cheap).
    out = model(input_ids=ids, position_ids=(local + prefix)[None], attention_mask=mask,
                cache=copy.deepcopy(cache), use_cache=True,
                logits_to_keep=torch.tensor(list(keep), dtype=torch.long, device=device))
    logprobs = torch.log_softmax(out.logits[0].float(), dim=-1)
    return _pick(logprobs, wanted)
