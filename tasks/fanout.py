"""Prefect side of expert.fanout: every piece of a stage a Prefect task run, submitted
through prefect-dask's DaskTaskRunner to the dask.distributed cluster `eval.runner` names.

The stage task (tasks/stage.py) stays one task with one artifact; the pieces run as its
child task runs on the workers and return scores only, which the stage merges. The runner
is entered inside the stage task rather than as the flow's task runner, so the stages that
cannot be split (import, quantize, train) never leave the flow's own process.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from expert.errors import ExpertError
from expert.evaluation.config import RunnerConfig
from expert.fanout import Piece, PieceFailed


CONNECT_TIMEOUT = "30s"  # for a scheduler to answer; a busy one takes seconds, an absent one never does


# No cache (the stage's artifact is what is cached) and no retries (scoring is
# deterministic: a retry repeats a failure); the result travels back through dask.
@task(name="piece", cache_policy=NO_CACHE, persist_result=False)
def run_piece(piece: Piece, threads: int | None = None) -> Any:
    from tasks.stage import library_logs_at_info

    library_logs_at_info()  # a worker process: its library logs (model load, scoring) reach the UI at INFO
    if threads is not None:  # dask's worker starts torch on one thread (OMP_NUM_THREADS=1)
        import torch

        torch.set_num_threads(threads)
    return piece.fn(**piece.kwargs)


@dataclass(frozen=True)
class DaskFanOut:
    """Runs pieces on a dask cluster: the one at `runner.address`, or a LocalCluster started for them."""

    runner: RunnerConfig

    @property
    def width(self) -> int:
        if self.runner.address is None:
            return self.runner.local_workers
        from distributed import Client

        try:
            with Client(self.runner.address, timeout=CONNECT_TIMEOUT, set_as_default=False) as client:
                return max(1, len(client.scheduler_info()["workers"]))
        except OSError as exc:  # distributed reports an unreachable scheduler as a timeout
            raise ExpertError(
                f"eval.runner.address: no dask scheduler answered at {self.runner.address} ({exc}). Start one "
                "(`dask scheduler`, then `dask worker ADDRESS` on each worker machine), correct the address, or "
                "set eval.runner.kind: local to score in this process") from None

    def __call__(self, pieces: list[Piece], on_done: Callable[[int], None] | None = None) -> list[Any]:
        from prefect_dask import DaskTaskRunner

        results: list[Any] = [None] * len(pieces)
        with DaskTaskRunner(**self._cluster()) as runner:
            threads = self.runner.threads_per_worker if self.runner.address is None else None
            futures = [runner.submit(run_piece.with_options(task_run_name=p.name), {"piece": p, "threads": threads})
                       for p in pieces]
            for i in _finished(futures, pieces, self.runner.timeout_s):
                try:
                    results[i] = futures[i].result()
                except Exception as exc:  # leaving the runner cancels the other pieces
                    raise PieceFailed(f"piece '{pieces[i].name}' failed on the dask cluster: "
                                      f"{type(exc).__name__}: {exc}") from exc
                if on_done is not None:
                    on_done(i)
        return results

    def _cluster(self) -> dict[str, Any]:
        if self.runner.address is not None:
            return {"address": self.runner.address}
        # Processes, one piece at a time each: torch scoring holds the GIL for much of a forward
        # pass, and each piece loads its own model. threads_per_worker is torch's, set per piece.
        return {"cluster_kwargs": {"n_workers": self.runner.local_workers, "processes": True,
                                   "threads_per_worker": 1}}


def _finished(futures: list, pieces: list[Piece], timeout_s: float | None) -> Iterator[int]:
    """Indices of `futures` as they finish; PieceFailed naming the rest once `timeout_s` is spent.

    The deadline bounds the waiting only. (Prefect's `as_completed(timeout=)` cancels whatever
    runs when it expires, the caller's own work between two results included, which would then
    be reported as a failed piece.)
    """
    done: queue.SimpleQueue[int] = queue.SimpleQueue()  # filled from dask's event loop thread
    for i, future in enumerate(futures):
        future.add_done_callback(lambda _, i=i: done.put(i))
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    unfinished = set(range(len(futures)))
    while unfinished:
        try:
            i = done.get(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            names = ", ".join(f"'{pieces[i].name}'" for i in sorted(unfinished))
            raise PieceFailed(
                f"eval.runner.timeout_s: {len(unfinished)} of {len(pieces)} pieces unfinished after {timeout_s:g} "
                f"s ({names}). The dask workers may be hung, gone or busy with other work: see the dask dashboard "
                "and the pieces' task runs in the Prefect UI, then raise timeout_s or restart the workers.") from None
        unfinished.discard(i)
        yield i


def fan_out(runner: RunnerConfig) -> DaskFanOut | None:
    """The fan-out `eval.runner` asks for; None scores in the stage's own process."""
    return DaskFanOut(runner) if runner.kind == "dask" else None
