"""Prefect side of expert.fanout: every piece of a stage a Prefect task run, submitted
through prefect-dask's DaskTaskRunner to the dask.distributed cluster `eval.runner` names.

The stage task (tasks/stage.py) stays one task with one artifact; the pieces run as its
child task runs on the workers and return scores only, which the stage merges. The runner
is entered inside the stage task rather than as the flow's task runner, so the stages that
cannot be split (import, quantize, train) never leave the flow's own process.
"""

from __future__ import annotations

from collections.abc import Callable
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
        from prefect.futures import as_completed
        from prefect_dask import DaskTaskRunner

        results: list[Any] = [None] * len(pieces)
        with DaskTaskRunner(**self._cluster()) as runner:
            threads = self.runner.threads_per_worker if self.runner.address is None else None
            futures = [runner.submit(run_piece.with_options(task_run_name=p.name), {"piece": p, "threads": threads})
                       for p in pieces]
            index = {future.task_run_id: i for i, future in enumerate(futures)}
            for future in as_completed(futures):
                i = index[future.task_run_id]
                try:
                    results[i] = future.result()
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


def fan_out(runner: RunnerConfig) -> DaskFanOut | None:
    """The fan-out `eval.runner` asks for; None scores in the stage's own process."""
    return DaskFanOut(runner) if runner.kind == "dask" else None
