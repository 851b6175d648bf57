"""One evaluation as independent pieces: plan them, score one, merge them.

A piece is part of one benchmark's questions, scored by `score_piece` with its own model
load and returned as per-question log-likelihoods (pieces write no files); `merge_pieces`
puts them back in the order of the whole evaluation, and `evaluate` goes on from there
exactly as in one process.

MMLU pieces hold whole subjects, balanced by question count: the prefix cache and the
batches are per subject, so each question is scored in the same batch as in one process.
PubMedQA pieces are contiguous shards, whose batches are drawn from the shard instead of
the whole split (other padding widths). In float32, predictions are the same and a
log-likelihood may differ in its last digits, from that and from a worker's own torch thread
count (SmolLM2-135M, MMLU: 7e-6 at most; tests/flows/test_fanout.py compares to 1e-5). In bf16
(a GPU, or 'auto' on a CPU with native bf16 matmuls) other padding widths round differently:
PubMedQA shards' log-likelihoods differ by bf16's rounding, enough to flip a near-tie.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from expert.errors import ExpertError
from expert.evaluation.config import EvalConfig
from expert.fanout import FanOut, Piece


def plan_pieces(config: EvalConfig, benchmark: str, model_dir: Path, data_dir: Path, adapter_dir: Path | None,
                frame: pd.DataFrame, count: int) -> list[Piece]:
    """At most `count` pieces covering every question of `frame` once."""
    common = {"config": config, "benchmark": benchmark, "model_dir": str(model_dir), "data_dir": str(data_dir),
              "adapter_dir": str(adapter_dir) if adapter_dir else None}
    if benchmark == "mmlu":
        groups = subject_groups(frame["subject"].tolist(), count)
        return [Piece(f"mmlu {i + 1}/{len(groups)} ({len(g)} subject{'s' * (len(g) > 1)}, {n} questions)", score_piece,
                      {**common, "subjects": g}) for i, (g, n) in enumerate(groups)]
    bounds = shard_bounds(len(frame), count)
    return [Piece(f"{benchmark} shard {i + 1}/{len(bounds)} (questions {lo + 1}-{hi})", score_piece,
                  {**common, "rows": (lo, hi)}) for i, (lo, hi) in enumerate(bounds)]


def subject_groups(subjects: list[str], count: int) -> list[tuple[list[str], int]]:
    """Whole subjects in `count` groups of about equal question counts, subjects in data order.

    Largest subject first into the emptiest group (ties: the lower group), so the plan
    depends on the data only.
    """
    sizes: dict[str, int] = {}
    for subject in subjects:
        sizes[subject] = sizes.get(subject, 0) + 1
    order = list(sizes)
    groups: list[list[str]] = [[] for _ in range(min(count, len(sizes)))]
    loads = [0] * len(groups)
    for subject in sorted(order, key=lambda s: (-sizes[s], order.index(s))):
        emptiest = loads.index(min(loads))
        groups[emptiest].append(subject)
        loads[emptiest] += sizes[subject]
    return [(sorted(g, key=order.index), n) for g, n in zip(groups, loads)]


def shard_bounds(total: int, count: int) -> list[tuple[int, int]]:
    """[lo, hi) row ranges of `count` contiguous shards of near-equal size (none empty)."""
    count = max(1, min(count, total))
    return [(i * total // count, (i + 1) * total // count) for i in range(count)]


def score_piece(config: EvalConfig, benchmark: str, model_dir: str, data_dir: str, adapter_dir: str | None = None,
                subjects: list[str] | None = None, rows: tuple[int, int] | None = None) -> dict:
    """Log-likelihoods of one piece's questions: {ids, scores, mode, load_s, scoring_s, host}."""
    from expert.evaluation.loading import load_model
    from expert.evaluation.runner import load_questions, score_frame

    frame = load_questions(config, benchmark, Path(data_dir))
    if subjects is not None:
        frame = frame[frame["subject"].isin(subjects)]
    if rows is not None:
        frame = frame.iloc[rows[0]:rows[1]]
    frame = frame.reset_index(drop=True)
    started = time.perf_counter()
    loaded = load_model(Path(model_dir), adapter_dir and Path(adapter_dir), config.device, config.dtype,
                        config.gptq_kernel)
    loaded_at = time.perf_counter()
    scores, mode = score_frame(loaded.model, loaded.tokenizer, frame, config, benchmark)
    return {"ids": frame["id"].tolist(), "scores": scores, "mode": mode,
            "load_s": round(loaded_at - started, 3), "scoring_s": round(time.perf_counter() - loaded_at, 3),
            "host": socket.gethostname(), "device": str(loaded.device),
            "dtype": str(loaded.dtype).replace("torch.", ""), "gptq_kernel": loaded.gptq_kernel}


def merge_pieces(frame: pd.DataFrame, pieces: list[Piece], results: list[dict]) -> tuple[list[list[float]], dict]:
    """Per-question scores in `frame` order, and the scoring mode of the whole evaluation."""
    by_id: dict[str, list[float]] = {}
    for piece, result in zip(pieces, results, strict=True):
        for qid, row in zip(result["ids"], result["scores"], strict=True):
            if qid in by_id:
                raise ExpertError(f"question {qid} was scored by two pieces (the last: '{piece.name}')")
            by_id[qid] = row
    missing = [qid for qid in frame["id"] if qid not in by_id]
    if missing or len(by_id) != len(frame):
        raise ExpertError(f"the pieces scored {len(by_id)} questions, the evaluation has {len(frame)} "
                          f"(missing e.g. {', '.join(missing[:3])}); was the data rewritten during the run?")
    mode = dict(results[0]["mode"])
    mode["one_pass_questions"] = sum(r["mode"]["one_pass_questions"] for r in results)
    return [by_id[qid] for qid in frame["id"]], mode


def score_in_pieces(config: EvalConfig, benchmark: str, model_dir: Path, data_dir: Path, adapter_dir: Path | None,
                    frame: pd.DataFrame, fan_out: FanOut,
                    progress: Callable[[int, int], None] | None = None) -> tuple[list[list[float]], dict, dict]:
    """(scores, mode, timing) of `frame`, scored in pieces through `fan_out`."""
    pieces = plan_pieces(config, benchmark, model_dir, data_dir, adapter_dir, frame,
                         config.runner.pieces or fan_out.width)
    done = [0]

    def finished(i: int) -> None:
        done[0] += _piece_size(pieces[i], frame)
        if progress is not None:
            progress(done[0], len(frame))

    started = time.perf_counter()
    results = fan_out(pieces, on_done=finished)
    # Wall time of the whole fan-out, model loads included (one process times scoring only).
    seconds = time.perf_counter() - started
    scores, mode = merge_pieces(frame, pieces, results)
    _same_precision(pieces, results)
    timing = {"scoring_s": round(seconds, 3), "questions_per_s": round(len(frame) / seconds, 3),
              "device": results[0]["device"], "dtype": results[0]["dtype"],
              "pieces": [{"name": p.name, "questions": len(r["ids"]), "load_s": r["load_s"],
                          "scoring_s": r["scoring_s"], "host": r["host"]} for p, r in zip(pieces, results)]}
    # Not required to agree (unlike the dtype): GPUs of two generations may each take their own.
    kernels = sorted({r["gptq_kernel"] for r in results if r.get("gptq_kernel")})
    if kernels:
        timing["gptq_kernel"] = " / ".join(kernels)
    return scores, mode, timing


def _same_precision(pieces: list[Piece], results: list[dict]) -> None:
    """One evaluation, one device kind and dtype: with `device: auto` on a cluster of GPU and CPU
    workers, pieces would be scored in bfloat16 and float32 and cached as one result."""
    seen: dict[tuple[str, str], str] = {}
    for piece, r in zip(pieces, results):
        seen.setdefault((r["device"].split(":")[0], r["dtype"]), piece.name)
    if len(seen) > 1:
        ran = "; ".join(f"'{name}' on {device} in {dtype}" for (device, dtype), name in seen.items())
        raise ExpertError(f"the pieces of one evaluation ran on different devices or dtypes ({ran}): set "
                          "eval.device and eval.dtype (not auto), or give the dask cluster workers of one kind")


def _piece_size(piece: Piece, frame: pd.DataFrame) -> int:
    if piece.kwargs.get("subjects") is not None:
        return int(frame["subject"].isin(piece.kwargs["subjects"]).sum())
    lo, hi = piece.kwargs["rows"]
    return hi - lo
