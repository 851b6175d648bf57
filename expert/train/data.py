"""Training examples: the evaluation prompt + " {answer}" + EOS, with the loss on the answer only.

Each row of a formatted split (`prompt`, `answer` columns) becomes one example. Tokenization
is the evaluator's (`expert.evaluation.scoring.encode_questions`, lm-eval's `_encode_pair`):
prompt + " " + answer is encoded as one string and split at the encoded prompt's length, so
the answer tokens trained on are exactly the tokens scored at evaluation. EOS follows the
answer, so the model also learns to stop. Prompt tokens get label -100 (no loss).

Batches are length-bucketed: each epoch shuffles the examples (seeded by seed and epoch),
cuts them into buckets of micro-batches, sorts each bucket by length, splits it into
micro-batches and shuffles the micro-batches. A batch is padded on the right only to its own
longest example, so similar lengths meet and little compute is spent on padding. A bucket holds
half an epoch's micro-batches, at least 8 and at most 50 (`bucket_size`): the more examples a
bucket sorts, the closer the lengths that meet, and two buckets or more an epoch still group
each example with others every epoch. On the PubMedQA lengths (450 examples, micro-batches of
7-9) buckets of 8 micro-batches padded 5.4-5.6% of the positions, half an epoch 1.5-2.1%.
transformers' LengthGroupedSampler (Trainer's `group_by_length`) sorts 50 batches at a time.

An optimizer step's micro-batches need not be the same size (`step_sizes`): 50 examples, at
most 8 at a time, are 8+7+7+7+7+7+7, where equal sizes would allow only 5 or 10. The
loss is divided by the whole step's answer tokens (`expert.train.step`), so the split changes
the gradient only by the order of float additions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from expert.errors import DataError, ModelError

IGNORE = -100  # label of positions without loss (torch cross_entropy's default ignore_index)
BUCKET_BATCHES = 8  # the fewest micro-batches a sorting bucket holds (all of them before 2026-11-29)
MAX_BUCKET_BATCHES = 50  # the most, as many as transformers' LengthGroupedSampler sorts at a time
_COLUMNS = ("id", "prompt", "answer")


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE over the prompt, the token itself over answer + EOS

    @cached_property
    def answer_tokens(self) -> int:
        """Labelled tokens (answer + EOS): what the loss sums over. Counted once, not every step."""
        return sum(label != IGNORE for label in self.labels)


@dataclass(frozen=True)
class EncodedSplit:
    examples: list[Example]
    truncated: int  # examples whose prompt lost tokens on the left to fit max_length
    truncated_ids: list[str]  # the first few of them, for the log

    @property
    def lengths(self) -> list[int]:
        return [len(e.input_ids) for e in self.examples]


def read_split(path: Path) -> dict[str, list[str]]:
    """The id, prompt and answer columns of a formatted split (`train.parquet`, `dev.parquet`)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist; run the data formatting stage first (it writes "
                        "train.parquet and dev.parquet)")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path} is not a readable Parquet file ({exc}); format the data again") from None
    missing = [c for c in _COLUMNS if c not in table.column_names]
    if missing:
        raise DataError(f"{path} lacks column(s) {', '.join(missing)}; it has {', '.join(table.column_names)}. "
                        "Training needs a split written by expert.benchmarks (id, prompt, answer)")
    cols = {c: table.column(c).to_pylist() for c in _COLUMNS}
    for i, (pid, prompt, answer) in enumerate(zip(cols["id"], cols["prompt"], cols["answer"])):
        # Whitespace alone counts as empty: a blank prompt encodes to no tokens, leaving nothing
        # before the answer to predict it from.
        blank = [name for name, text in (("prompt", prompt), ("answer", answer)) if not (text and text.strip())]
        if blank:
            raise DataError(f"{path}: row {i} (id {pid!r}) has an empty or whitespace-only {' and '.join(blank)}; "
                            "fix or drop that row of the source data and format the data again")
    if not cols["id"]:
        raise DataError(f"{path} has no rows; nothing to train on")
    return cols


def encode_split(tokenizer, rows: dict[str, list[str]], max_length: int) -> EncodedSplit:
    """Tokenize as the evaluator does, append EOS, mask the prompt, fit into max_length."""
    from expert.evaluation.scoring import encode_questions

    eos = tokenizer.eos_token_id
    if eos is None:
        raise ModelError("the tokenizer has no eos_token; training appends it after each answer. "
                         "Set eos_token in the model folder's tokenizer_config.json")
    questions = encode_questions(tokenizer, rows["prompt"], [[" " + a] for a in rows["answer"]])
    examples, truncated = [], []
    for pid, question in zip(rows["id"], questions):
        prompt, answer = question.context, question.choices[0] + [eos]
        if not prompt:  # e.g. only characters the tokenizer drops; the loss needs a token before the answer
            raise DataError(f"example {pid!r}: its prompt encodes to no tokens with this tokenizer; fix or drop "
                            "that row of the source data and format the data again")
        if len(answer) >= max_length:
            raise DataError(f"example {pid!r}: its answer and EOS take {len(answer)} tokens, which leaves no room "
                            f"for the prompt in max_length={max_length}; raise train.max_length")
        overflow = len(prompt) + len(answer) - max_length
        if overflow > 0:
            prompt = prompt[overflow:]  # keep the end of the prompt, next to the answer
            truncated.append(str(pid))
        examples.append(Example(prompt + answer, [IGNORE] * len(prompt) + answer))
    return EncodedSplit(examples, len(truncated), truncated[:5])


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example of this batch; pad positions get no loss.

    No attention mask: with padding on the right, causal attention keeps real tokens from
    ever seeing a pad (see `step.answer_loss_sum`).
    """
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, :len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[row, :len(e.labels)] = torch.tensor(e.labels)
    return {"input_ids": ids, "labels": labels}


def step_sizes(examples: int, most: int, processes: int = 1) -> list[int]:
    """Micro-batch sizes of one optimizer step: `examples` in as few near-equal parts of at most
    `most` as there can be, their count a multiple of `processes` (each rank then runs as many
    forwards), larger parts first. A `most` that divides `examples` gives equal parts."""
    parts = -(-examples // most)
    parts = -(-parts // processes) * processes
    size, larger = divmod(examples, parts)
    return [size + 1] * larger + [size] * (parts - larger)


def _epoch_sizes(examples: int, sizes: list[int]) -> list[int]:
    """Micro-batch sizes of one epoch: whole steps, then the rest cut as a step's first sizes."""
    steps, rest = divmod(examples, sum(sizes))
    cuts = sizes * steps
    for size in sizes:
        if rest <= 0:
            break
        cuts.append(min(size, rest))
        rest -= size
    return cuts


def bucket_size(per_epoch: int) -> int:
    """Micro-batches per sorting bucket, for an epoch of `per_epoch` micro-batches."""
    return max(BUCKET_BATCHES, min(MAX_BUCKET_BATCHES, per_epoch // 2))


def epoch_batches(lengths: list[int], sizes: int | list[int], seed: int, epoch: int,
                  bucket_batches: int = BUCKET_BATCHES) -> list[list[int]]:
    """One epoch's micro-batches (lists of example indices), length-bucketed, seeded by (seed, epoch).

    `sizes`: the micro-batch size, or one optimizer step's sizes (`step_sizes`). Uneven sizes
    are kept in the step's pattern: a micro-batch is shuffled only among those of its size, so
    each whole step of the epoch has exactly the sizes asked for.
    """
    pattern = [sizes] if isinstance(sizes, int) else list(sizes)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths)).tolist()
    cuts = _epoch_sizes(len(order), pattern)
    batches, start = [], 0
    for first in range(0, len(cuts), bucket_batches):
        group = cuts[first:first + bucket_batches]
        chunk = sorted(order[start:start + sum(group)], key=lambda i: lengths[i])  # stable: ties keep shuffled order
        start += sum(group)
        for size in group:
            batches.append(chunk[:size])
            chunk = chunk[size:]
    if len(set(pattern)) == 1:  # equal sizes: one shuffle of all (the data order of runs before uneven sizes)
        return [batches[i] for i in rng.permutation(len(batches)).tolist()]
    pools: dict[int, list[list[int]]] = {}
    for batch in batches:
        pools.setdefault(len(batch), []).append(batch)
    shuffled = {size: iter([pool[i] for i in rng.permutation(len(pool)).tolist()])
                for size, pool in sorted(pools.items())}
    return [next(shuffled[size]) for size in cuts]


class BatchPlan:
    """The whole run's data order: optimizer step -> its micro-batches, a pure function of the seed.

    `sizes` are one step's micro-batch sizes (`step_sizes`). Epochs follow each other as one
    stream of micro-batches; step s takes micro-batches s*len(sizes) .. (s+1)*len(sizes)-1 of it,
    so a resumed run needs only its step counter. Where the data is not a whole number of steps,
    a step that spans two epochs may hold a few examples more or fewer than sum(sizes), never a
    micro-batch above max(sizes). `bucket_batches`: micro-batches per sorting bucket (default
    `bucket_size`'s; a resumed run passes its own, which its checkpoint records).
    """

    def __init__(self, lengths: list[int], sizes: list[int], epochs: float, seed: int,
                 max_steps: int | None = None, bucket_batches: int | None = None):
        self.lengths, self.sizes, self.seed = lengths, list(sizes), seed
        self.micro, self.accum = max(self.sizes), len(self.sizes)
        self.per_epoch = len(_epoch_sizes(len(lengths), self.sizes))
        self.bucket_batches = bucket_batches or bucket_size(self.per_epoch)
        # Exact arithmetic on the epochs as written: 1.1 * 50 is 55.00000000000001 in floats,
        # and ceil would add a step.
        self.total_steps = max(1, math.ceil(Fraction(str(epochs)) * self.per_epoch / self.accum))
        if max_steps is not None:
            self.total_steps = min(self.total_steps, max_steps)
        self._epochs: dict[int, list[list[int]]] = {}

    @property
    def micro_text(self) -> str:
        """The micro-batch size for the log: '5', or '7-8' for uneven ones."""
        low = min(self.sizes)
        return str(self.micro) if low == self.micro else f"{low}-{self.micro}"

    def _batch(self, index: int) -> list[int]:
        epoch, pos = divmod(index, self.per_epoch)
        if epoch not in self._epochs:
            self._epochs = {epoch: epoch_batches(self.lengths, self.sizes, self.seed, epoch, self.bucket_batches)}
        return self._epochs[epoch][pos]

    def step(self, step: int) -> list[list[int]]:
        """Micro-batches of optimizer step `step` (0-based)."""
        return [self._batch(i) for i in range(step * self.accum, (step + 1) * self.accum)]

    def epoch_after(self, steps: int) -> float:
        """Epochs completed after `steps` optimizer steps."""
        return steps * self.accum / self.per_epoch

    def padding_fraction(self) -> float:
        """Share of padded positions over all micro-batches of the run."""
        real = padded = 0
        for step in range(self.total_steps):
            for batch in self.step(step):
                lens = [self.lengths[i] for i in batch]
                real += sum(lens)
                padded += max(lens) * len(lens)
        return 1 - real / padded


def unbucketed_padding_fraction(lengths: list[int], batch_size: int, seed: int) -> float:
    """Padding share of plain shuffled batches (for comparison in the summary)."""
    order = np.random.default_rng([seed, 0]).permutation(len(lengths)).tolist()
    batches = [[lengths[i] for i in order[j:j + batch_size]] for j in range(0, len(order), batch_size)]
    return 1 - sum(map(sum, batches)) / sum(max(b) * len(b) for b in batches)


def eval_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Length-sorted batches for the dev loss: the order does not matter, the padding does."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[j:j + batch_size] for j in range(0, len(order), batch_size)]
