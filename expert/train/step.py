"""One optimizer step (forward, backward, update) and the dev loss, on answer tokens only.

The loss of a step is the summed cross-entropy of its answer + EOS tokens divided by their
count over the whole step (all micro-batches), so gradient accumulation gives the gradient
of one big batch. The forward runs under bf16 autocast where `autocast_dtype` says so
(train.precision: on GPUs and CPUs with native bf16 matmuls), else in the weights' dtype.
On several processes each takes its share of the micro-batches, still divided by the whole
step's count, and the gradients are summed (see `expert.train.distributed`).
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F

from expert.modeling import cpu_has_native_bf16, gpu_has_bf16
from expert.train.data import IGNORE, EncodedSplit, collate, eval_batches
from expert.train.distributed import Ranks
from expert.transfer import to_device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of train.precision on `device` (None: no autocast)."""
    if precision == "float32":
        return None
    if precision == "bfloat16":
        return torch.bfloat16
    native = gpu_has_bf16() if device.type == "cuda" else cpu_has_native_bf16()
    return torch.bfloat16 if native else None


def resolve_precision(precision: str, device: torch.device) -> str:
    """train.precision as `device` runs it: "bfloat16" or "float32" (what a checkpoint records)."""
    return "bfloat16" if autocast_dtype(precision, device) == torch.bfloat16 else "float32"


class Runner:
    """Forward/backward/update of one optimizer step, and the dev loss."""

    def __init__(self, model, optimizer, scheduler, train_set: EncodedSplit, pad_id: int,
                 max_grad_norm: float | None, ranks: Ranks = Ranks(), precision: str = "auto"):
        self.model, self.optimizer, self.scheduler, self.ranks = model, optimizer, scheduler, ranks
        self.examples, self.pad_id, self.max_grad_norm = train_set.examples, pad_id, max_grad_norm
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.device = self.params[0].device
        self.amp_dtype = autocast_dtype(precision, self.device)

    @property
    def precision_name(self) -> str:
        """What the run log and summary.json say the matmuls compute in."""
        return "bfloat16 autocast" if self.amp_dtype == torch.bfloat16 else "float32"

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def step(self, batches: list[list[int]]) -> tuple[float, int, float, float | None, float]:
        """One optimizer step over `batches` (all ranks'); loss is the mean over the step's answer tokens."""
        start = time.perf_counter()
        chosen = [self.examples[i] for batch in batches for i in batch]
        targets = sum(e.answer_tokens for e in chosen)
        tokens = sum(len(e.input_ids) for e in chosen)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for batch in self.ranks.share(batches):
            with self.autocast():
                loss_sum = answer_loss_sum(self.model, collate([self.examples[i] for i in batch], self.pad_id),
                                           self.device)
            # Divide by the step's token count, not the micro-batch's: every answer token weighs the same.
            (loss_sum / targets).backward()
            total += loss_sum.detach()  # no .item() here: the host queues the next micro-batch meanwhile
        self.ranks.sum_grads(self.params)  # from here on every rank holds the same gradient
        self.ranks.sum_(total)
        grad_norm = None
        if self.max_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = total.item() / targets  # the step's one host sync (it also waits for the GPU: honest timing)
        grad_norm = None if grad_norm is None else float(grad_norm)
        return loss, tokens, time.perf_counter() - start, grad_norm, lr

    @torch.no_grad()
    def dev_loss(self, dev_set: EncodedSplit, batch_size: int) -> float:
        """Mean answer-token loss on the dev split (dropout off), its batches shared out among the ranks."""
        self.model.eval()
        batches = eval_batches(dev_set.lengths, batch_size)
        mine = self.ranks.share(batches)
        total, count = 0.0, 0
        for i in range(self.ranks.rounds(len(batches))):
            # A lockstep (fsdp) rank out of batches still runs a forward, uncounted, with the others.
            chosen = [dev_set.examples[j] for j in (mine[i] if i < len(mine) else batches[0])]
            with self.autocast():
                loss = answer_loss_sum(self.model, collate(chosen, self.pad_id), self.device).item()
            if i < len(mine):
                total += loss
                count += sum(e.answer_tokens for e in chosen)
        self.model.train()
        if self.ranks.many:
            total, count = self.ranks.sum_(torch.tensor([total, count], dtype=torch.float64,
                                                        device=self.device)).tolist()
        return total / count


def answer_loss_sum(model, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """Summed cross-entropy over the labelled (answer + EOS) tokens of a right-padded batch.

    Only the labelled tokens need logits, a few per example, so the vocabulary projection is
    given just their hidden states (`_HeadInput` gathers them at the output head's input): the
    [batch, positions, vocabulary] logits of the prompt are never built. Asking the model for the
    logits from the batch's first labelled position on (`logits_to_keep`) was not enough: in a
    batch of 48 examples padded to 512, a short example's answer sits early, and the 8B preset
    (128k vocabulary) then built ~15 GiB of logits that the memory probe, whose examples all end
    at the batch's width, never saw (H100, bench/results/gpu_h100_2026-11-27b.json: 29.5 GiB
    peak under a 24 GiB limit).
    """
    labels = batch["labels"]
    # position p predicts token p + 1; found on the host (the batch is built there): no device sync
    rows, cols = (labels[:, 1:] != IGNORE).nonzero(as_tuple=True)
    # Queued, not waited for (expert.transfer): the host builds and launches this micro-batch
    # while the GPU still runs the last one's backward.
    target = to_device(labels[:, 1:][rows, cols], device)
    rows, cols = to_device(rows, device), to_device(cols, device)
    # No attention mask: padding is on the right, so causal attention never lets a real token
    # see a pad, and pad positions carry no label. Without a mask SDPA takes its plain causal
    # (flash) path; with one, on an H100 it took cuDNN attention, which builds a graph for
    # every new batch shape (a third of a step's CPU time on SmolLM2-135M).
    ids = to_device(batch["input_ids"], device)
    with _HeadInput(model, rows, cols, ids.shape) as head:
        out = model(input_ids=ids, logits_to_keep=0, use_cache=False)  # 0: every position reaches the head
    if head.gathered:
        logits = out.logits[0]
    else:  # aligned on the right, as a model that puts positions of its own first returns them
        offset = out.logits.shape[1] - ids.shape[1]
        if offset < 0 or out.logits.shape[0] != ids.shape[0]:
            raise ValueError(f"the model returned logits of shape {tuple(out.logits.shape)} for input ids "
                             f"{tuple(ids.shape)}: the training loss needs one row of logits per position")
        logits = out.logits[rows, cols + offset]
    return F.cross_entropy(logits.float(), target, ignore_index=IGNORE, reduction="sum")


class _HeadInput:
    """While active, the model's output head (lm_head) sees only the hidden states at (rows, cols),
    as one [1, N, hidden] sequence: logits for N tokens instead of batch x width. Whatever the
    model does to the head's output (a scale, a soft cap) is elementwise and still applies. A
    model that computes its logits without calling that module leaves `gathered` False, and the
    caller picks the positions from the full logits."""

    def __init__(self, model, rows: torch.Tensor, cols: torch.Tensor, shape: torch.Size):
        self.rows, self.cols, self.shape, self.gathered, self.handle = rows, cols, tuple(shape), False, None
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None

    def _gather(self, module, args):
        if not args:  # called with keyword arguments only: leave it, the caller picks from the full logits
            return None
        hidden = args[0]
        if hidden.dim() != 3 or tuple(hidden.shape[:2]) != self.shape:  # not the batch's positions: leave it
            return None
        self.gathered = True
        return (hidden[self.rows, self.cols].unsqueeze(0),) + tuple(args[1:])

    def __enter__(self):
        if self.head is not None:
            self.handle = self.head.register_forward_pre_hook(self._gather)
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.remove()
