"""Independent pieces of one stage's work, and the interface that runs them somewhere.

A stage that can split its work (evaluation: groups of MMLU subjects or PubMedQA shards;
selection: one checkpoint each) describes it as `Piece`s: a named call into this library.
Whoever builds the stage decides where the pieces run by passing a `FanOut`: the
orchestrator (tasks/fanout.py) submits them to a dask cluster as Prefect tasks; `InProcess`
runs them here, one after another (tests, notebooks). The stage then merges the results
itself, so the pieces write nothing into the artifact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from expert.errors import ExpertError


@dataclass(frozen=True)
class Piece:
    """`fn(**kwargs)`: a module-level function of this library (workers import it by name)."""

    name: str  # shown as the piece's task run name, and in the error when it fails
    fn: Callable[..., Any]
    kwargs: dict[str, Any] = field(default_factory=dict)


class PieceFailed(ExpertError):
    """One piece raised; the stage fails with the piece named."""


class FanOut(Protocol):
    # How many pieces to aim for when the work can be split freely (about one per worker).
    width: int

    def __call__(self, pieces: list[Piece], on_done: Callable[[int], None] | None = None) -> list[Any]:
        """The pieces' results in the order of `pieces`; `on_done(i)` as piece i finishes."""
        ...


@dataclass(frozen=True)
class InProcess:
    """Runs the pieces in this process, in order: the reference for any other fan-out."""

    width: int = 1

    def __call__(self, pieces: list[Piece], on_done: Callable[[int], None] | None = None) -> list[Any]:
        results = []
        for i, piece in enumerate(pieces):
            try:
                results.append(piece.fn(**piece.kwargs))
            except Exception as exc:
                raise PieceFailed(f"piece '{piece.name}' failed: {type(exc).__name__}: {exc}") from exc
            if on_done is not None:
                on_done(i)
        return results
