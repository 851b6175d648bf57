"""How a run spends memory: the micro-batch size and gradient checkpointing, given or found.

    plan = plan_memory(model, config, longest=max(lengths), device=device, answer_tokens=max(answers))

`micro_batch_size: auto` takes the largest micro-batch whose forward + backward on the longest
training example fits the memory limit; a step of `effective_batch_size` examples (the same
whatever the card) is then split into as few near-equal micro-batches as that allows
(`expert.train.data.step_sizes`: 50 examples, at most 8 at a time, are 8+7+7+7+7+7+7). Bigger
micro-batches keep a GPU busier, which matters most for a 4-bit base whose weights are
dequantized once per micro-batch: on an H100 the 33B job ran 1.17x faster as 8+7+7+7+7+7+7
than as micro-batches of 5, the largest divisor of 50 that fits 24 GiB (bench/README.md).
Memory grows with the micro-batch, so the largest that fits is found by bisection.
`gradient_checkpointing: auto` then leaves checkpointing off when that micro-batch fits
without it: recomputing a layer's forward costs a third of that layer's compute, paid only when
memory is short. When it does not fit, only as many decoder layers as it needs recompute
(`expert.train.recompute`; the count by bisection, started from a guess the probes' peaks give):
each layer left out keeps its activations and saves its recompute. The largest micro-batch that
fits without checkpointing (unless that is a single example against 4 or more), and a
micro-batch between the two with as few layers recomputed as it needs, are then timed against
it, all at the typical example's length (the median: most batches are near it); a smaller
micro-batch wins only when it is more than SPEED_MARGIN faster than the best larger one. Which wins depends on the card and model: fewer
recomputed layers save compute, a bigger micro-batch dequantizes a 4-bit base's weights for more
tokens. A probe times one pass over one shape; costs it does not see (one per micro-batch, more
of them the smaller the micro-batch) made the close call go the wrong way on the 8B preset: 7
examples without checkpointing, timed at the longest length 0.7% faster than 48 with it, ran at
3,600 tokens/s where 48 with checkpointing had run at 5,450-6,268 (H100, bench/README.md).

On a GPU, "fits" is measured: one forward + backward of a batch of the longest example's length,
each with as many labelled tokens as the most any example has (the vocabulary projection is
built for those; peak `torch.cuda.max_memory_allocated`, plus the optimizer's two moments), kept under 90% of
`memory_limit_gib` (default: all memory free at start, plus what the model already holds). On the
CPU it is an estimate of the saved activations against half of the available RAM, and 'auto'
micro-batches are capped at 8 (a CPU gains little from bigger ones).

On several processes (ddp) every rank probes its own card and a setting is taken only if it
fits on all of them (`Ranks.agree` after each probe), so all ranks choose alike without a
broadcast; a step's micro-batch count is a multiple of processes. Under fsdp a probe's forward
would need every rank in step, and one rank's out-of-memory mid-forward would leave the others
waiting for it, so there is no probe: micro_batch_size must be a number (the config says so)
and gradient_checkpointing 'auto' means on.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass

import torch

from expert.errors import ExpertError
from expert.train.config import TrainConfig
from expert.train.data import IGNORE, step_sizes
from expert.train.distributed import Ranks
from expert.train.recompute import decoder_layers, fewest, recompute, set_checkpointing

HEADROOM = 0.9  # share of the limit a probe may reach: the allocator fragments, batches vary
SPEED_MARGIN = 1.05  # how much faster a smaller micro-batch must time to win over a larger one
CPU_AUTO_MICRO = 8
MAX_AUTO_MICRO = 64


@dataclass(frozen=True)
class MemoryPlan:
    micro_batch_size: int
    gradient_checkpointing: bool
    limit_gib: float | None  # None on the CPU
    probe_peak_gib: float | None = None  # measured peak of the chosen setting (GPU only)
    # tokens/s of each setting timed against the others, when there was a choice (GPU only)
    probe_tokens_per_s: dict[str, float] | None = None
    # With checkpointing on: how many decoder layers (the first ones) recompute their forward;
    # None: all of them (and plans recorded before there was a choice)
    recomputed_layers: int | None = None

    @classmethod
    def from_dict(cls, data: dict) -> MemoryPlan:
        return cls(**data)

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def checkpointing_text(self) -> str:
        """'off', 'on' or 'on for the first 20 layers' (what the run log says)."""
        if not self.gradient_checkpointing:
            return "off"
        return "on" if self.recomputed_layers is None else f"on for the first {self.recomputed_layers} layers"


def plan_memory(model, config: TrainConfig, longest: int, device: torch.device,
                ranks: Ranks = Ranks(), answer_tokens: int = 3, typical: int | None = None) -> MemoryPlan:
    """Resolve the 'auto' memory settings of `config` for `model` (LoRA attached) on `device`;
    `longest`: the longest example's tokens (what must fit), `typical`: the median example's (what
    a speed comparison is timed at; default `longest`), `answer_tokens`: the most labelled tokens of one."""
    micros = _micro_candidates(config, device)
    checkpointing = [config.gradient_checkpointing] if isinstance(config.gradient_checkpointing, bool) \
        else [True] if ranks.lockstep else [False, True]
    if len(micros) == 1 and len(checkpointing) == 1:  # nothing to decide: no probe
        set_checkpointing(model, checkpointing[0])
        limit = _limit_bytes(config, device) if device.type == "cuda" else None
        return MemoryPlan(micros[0], checkpointing[0], limit and round(limit / 2**30, 2))
    # Settings are (micro-batch, layers recomputed): 0 is no checkpointing, `every` all layers.
    every = max(1, len(decoder_layers(model)))
    if device.type == "cuda":
        fits, limit = _probe_fits(model, device, config, every, answer_tokens), _limit_bytes(config, device)
    else:
        fits, limit = _estimate_fits(model, every), None
    frugal = every if checkpointing[-1] else 0
    # The largest micro-batch that fits with the most frugal allowed setting ...
    chosen = _largest(micros, lambda m: ranks.agree(fits(m, longest, frugal, limit)))
    if chosen is None:
        raise out_of_memory_error(config, limit, f"even {micros[-1]} example(s) of {longest} tokens did not fit")
    setting, measured = (chosen, frugal), None
    if checkpointing == [False, True]:
        def needs(micro: int) -> int:
            # Each rank's guess comes from its own card's peaks: ranks that probed different counts
            # would agree on answers to different questions. So several ranks bisect alone.
            guess = None if ranks.many else getattr(fits, "guess", None)
            return fewest(every, lambda r: ranks.agree(fits(micro, longest, r, limit)),
                          guess and (lambda: guess(micro, longest, every, limit)))

        # ... recomputing as few layers as it needs (none, if it fits without) ...
        setting = (chosen, needs(chosen))
        if setting[1] and hasattr(fits, "speed"):
            # ... against smaller micro-batches that recompute fewer layers, timed.
            options = [setting, *_smaller_options(micros, setting, needs,
                                                  lambda m: ranks.agree(fits(m, longest, 0, limit)))]
            if len(options) > 1:
                width = min(typical or longest, longest)
                speeds = [fits.speed(m, width, r, limit) for m, r in options]
                measured = {_setting_text(m, r, every): s for (m, r), s in zip(options, speeds)}
                best = 0
                for i in range(1, len(options)):
                    # Agreed, like every choice here: ranks that chose differently would split steps differently.
                    if ranks.agree(speeds[i] > SPEED_MARGIN * speeds[best]):
                        best = i
                setting = options[best]
    chosen, recomputed = setting
    peak = getattr(fits, "peaks", {}).get((chosen, longest, recomputed))
    recompute(model, recomputed, every)
    if device.type == "cuda":  # the run's logged peaks are its own, not the last probe's (often one cut off at the limit)
        torch.cuda.reset_peak_memory_stats(device)
    return MemoryPlan(chosen, recomputed > 0, limit and round(limit / 2**30, 2), peak and round(peak / 2**30, 2),
                      measured and {k: round(v) for k, v in measured.items()},
                      recomputed if 0 < recomputed < every else None)


def _smaller_options(micros: list[int], setting: tuple[int, int], needs, fits_plain) -> list[tuple[int, int]]:
    """What a checkpointed setting (micro-batch, layers recomputed) is timed against, larger
    micro-batch first: the candidate nearest the geometric middle of it and the largest smaller
    micro-batch that fits without checkpointing (1 when none does), with as few layers recomputed
    as it needs, if that is fewer; and that micro-batch without checkpointing.

    One example at a time is not timed against 4 or more: on every H100 run of the 33B shape it
    was 1.6-2.8x slower than the checkpointed micro-batch, and under train.compile its probe costs
    a compile of its own (a dimension of size 1 is specialized)."""
    chosen, recomputed = setting
    smaller = [m for m in micros if m < chosen and not (m == 1 and chosen >= 4)]
    plain = _largest(smaller, fits_plain)
    options = []
    between = [m for m in smaller if m > (plain or 0)]
    if between:
        middle = min(between, key=lambda m: abs(m * m - chosen * (plain or 1)))
        layers = needs(middle)
        if layers < recomputed:
            options.append((middle, layers))
    if plain is not None:
        options.append((plain, 0))
    return options


def _setting_text(micro: int, recomputed: int, every: int) -> str:
    if recomputed == 0:
        return f"{micro} without"
    return f"{micro} with checkpointing" if recomputed == every else f"{micro} recomputing {recomputed} of {every}"


def _micro_candidates(config: TrainConfig, device: torch.device) -> list[int]:
    """Micro-batch sizes to try, largest first: the largest micro-batch of each way to split a step."""
    if config.micro_batch_size != "auto":
        return [config.micro_batch_size]
    cap = MAX_AUTO_MICRO if device.type == "cuda" else CPU_AUTO_MICRO
    n, processes = config.effective_batch_size, config.processes
    return sorted({max(step_sizes(n, m, processes)) for m in range(1, min(n // processes, cap) + 1)}, reverse=True)


def _largest(candidates: list[int], ok) -> int | None:
    """The largest of `candidates` (largest first) for which ok(m) holds, by bisection: ok must hold
    for every candidate below one it holds for (what fits in memory does)."""
    low, high = 0, len(candidates)
    while low < high:
        middle = (low + high) // 2
        if ok(candidates[middle]):
            high = middle
        else:
            low = middle + 1
    return candidates[low] if low < len(candidates) else None


def _limit_bytes(config: TrainConfig, device: torch.device) -> int:
    if config.memory_limit_gib is not None:
        return int(config.memory_limit_gib * 2**30)
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_allocated(device)


def _probe_fits(model, device: torch.device, config: TrainConfig, every: int, answer_tokens: int = 3):
    """fits(micro, length, recomputed, limit): run one forward + backward with that many layers
    recomputed and read the peak."""
    from expert.train.step import answer_loss_sum, autocast_dtype

    amp = autocast_dtype(config.precision, device)  # probe as the run will compute
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    moments = 0 if config.optimizer != "adamw" else 2 * 4 * trainable  # 8-bit optimizers: ~4x less, ignored
    peaks: dict[tuple, int | None] = {}

    def fits(micro: int, length: int, recomputed: int, limit: int) -> bool:
        key = (micro, length, recomputed)
        if key not in peaks:
            with _capped(device, limit):
                peaks[key] = _probe(model, answer_loss_sum, device, micro, length, (recomputed, every), amp=amp,
                                    answer_tokens=answer_tokens)
        peak = peaks[key]
        return peak is not None and peak + moments <= HEADROOM * limit

    def speed(micro: int, length: int, recomputed: int, limit: int) -> float:
        """Tokens/s of a forward + backward, timed after a warm-up pass."""
        with _capped(device, limit):
            peak = _probe(model, answer_loss_sum, device, micro, length, (recomputed, every), repeats=2, amp=amp,
                          answer_tokens=answer_tokens)
        return 0.0 if peak is None else micro * length / _probe.seconds

    def guess(micro: int, length: int, every: int, limit: int) -> int | None:
        """The fewest layers to recompute, from the peaks with one and two fewer than all: each
        further layer left out adds about what the second did. (Not from all and one fewer: those
        peaks are about equal, see recompute.fewest.)"""
        one, two = peaks.get((micro, length, every - 1)), peaks.get((micro, length, every - 2))
        if one is None or two is None or two <= one:
            return None
        return every - 2 - int((HEADROOM * limit - moments - two) // (two - one))

    fits.peaks, fits.speed, fits.guess = peaks, speed, guess
    return fits


@contextlib.contextmanager
def _capped(device: torch.device, limit: int):
    """Let the allocator fail at the limit (on a card larger than the limit a probe too big for it
    then stops early, instead of running to the end to be measured)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    if limit >= total:
        yield
        return
    torch.cuda.set_per_process_memory_fraction(limit / total, index)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, index)


def _probe(model, loss_fn, device, micro: int, length: int, layers: tuple[int, int], repeats: int = 1,
           amp: torch.dtype | None = torch.bfloat16, answer_tokens: int = 3) -> int | None:
    """Peak bytes of forward + backward on a (micro, length) batch with `layers` (how many
    recompute, of how many); None when it ran out of memory.

    With repeats > 1 the last pass is timed (the earlier ones warm the allocator and kernels)
    and the seconds land in `_probe.seconds`.
    """
    recompute(model, *layers)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    peak = None
    try:
        ids = torch.zeros((micro, length), dtype=torch.long)
        labels = torch.full((micro, length), IGNORE, dtype=torch.long)
        labels[:, -max(1, min(answer_tokens, length - 1)):] = 0  # the first token is always prompt
        for _ in range(repeats):
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            with torch.autocast("cuda", dtype=amp or torch.bfloat16, enabled=amp is not None):
                loss = loss_fn(model, {"input_ids": ids, "labels": labels}, device)
            loss.backward()
            torch.cuda.synchronize(device)
            _probe.seconds = time.perf_counter() - start
            loss = None
            model.zero_grad(set_to_none=True)
        peak = torch.cuda.max_memory_allocated(device)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
        if not _is_oom(exc):
            raise
    loss = None
    model.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    return peak


def _is_oom(exc: BaseException) -> bool:
    """torch's OutOfMemoryError, or an extension's RuntimeError about allocating (cuBLAS, bitsandbytes)."""
    text = str(exc)
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in text or "ALLOC_FAILED" in text


def _estimate_fits(model, every: int):
    """CPU: saved activations of Llama-style blocks in float32 vs RAM: those of every layer not
    recomputed, and of one layer at a time for those that are."""
    cfg = model.config
    hidden, inter = cfg.hidden_size, getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)
    per_layer, layers = (8 * hidden + 4 * inter) * 4, cfg.num_hidden_layers
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): assume it fits
        available = None

    def fits(micro: int, length: int, recomputed: int, limit) -> bool:
        recomputed = round(layers * recomputed / every)  # `every` is 1 for a model checkpointed whole
        need = micro * length * per_layer * (layers - recomputed + (recomputed > 0))
        return available is None or need <= available / 2

    return fits


def out_of_memory_error(config: TrainConfig, limit: int | None, what: str) -> ExpertError:
    """The error a run raises instead of CUDA's traceback: what ran out, and the knobs."""
    cap = f"{limit / 2**30:.1f} GiB" if limit else "the GPU's memory"
    if config.memory_limit_gib is not None:
        cap += " (train.memory_limit_gib)"
    micro = config.micro_batch_size
    return ExpertError(
        f"training ran out of GPU memory ({what}; the limit is {cap}). Lower train.micro_batch_size "
        f"(now {micro}; 'auto' finds the largest that fits) and keep effective_batch_size, lower "
        f"train.max_length (now {config.max_length}), or set train.gradient_checkpointing: true "
        f"(now {config.gradient_checkpointing}); an 8-bit optimizer (train.optimizer: paged_adamw_8bit) "
        "also saves memory")
