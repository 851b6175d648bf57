"""Resumable MMLU scoring: each finished subject's log-likelihoods kept in the stage's work folder.

Full MMLU is 14,042 questions: about 25 minutes (estimated) for SmolLM2-135M on 2 CPU cores,
minutes for a 33B model on a GPU, all of it lost to a crash (a killed worker, a preempted machine)
before. With prefix caching on (eval.prefix_cache, the default) every subject is planned, cached
and batched on its own (scoring.score_questions' groups), so a subject scored alone gets exactly
the scores it gets in a whole run. So each subject's scores are written to
`<work_dir>/mmlu-scores/` as its last question is scored (a temp file renamed into place), and a
rerun of the same stage key loads them and scores only the subjects still missing: its outputs are
those of an uninterrupted run. The artifact store deletes the work folder once the artifact is
published.

A kept subject is used only if it holds the question ids the evaluation asks now and was scored
on the same device kind in the same dtype with the same GPTQ kernel (eval.device, eval.dtype and
eval.gptq_kernel 'auto' resolve by machine);
anything else, an unreadable file included, is scored again. PubMedQA (its batches are drawn from
the whole split) and MMLU without prefix caching are scored whole, as before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from expert.atomic import write_text_atomic

FOLDER = "mmlu-scores"
log = logging.getLogger(__name__)

# score(rows still to score, on_scored(row, scores)) -> (their scores, the scoring mode)
Score = Callable[[pd.DataFrame, Callable[[int, list[float]], None]], tuple[list[list[float]], dict]]


def resumable(benchmark: str, prefix_cache: bool, frame: pd.DataFrame) -> bool:
    """Whether the evaluation scores its questions in independent subjects (see the module doc):
    prefix caching groups them by their "prefix" column where there is one (else by subject),
    so no such group may span two subjects."""
    if benchmark != "mmlu" or not prefix_cache:
        return False
    return "prefix" not in frame.columns or bool((frame.groupby("prefix")["subject"].nunique() <= 1).all())


def score_keeping_subjects(frame: pd.DataFrame, work_dir: Path, precision: dict[str, str],
                           score: Score) -> tuple[list[list[float]], dict | None, list[int]]:
    """(scores in `frame` order, the mode of the scoring done now or None if none was needed,
    the positions whose scores came from an earlier attempt). `precision`: {"device": kind,
    "dtype": name} of the loaded model, which a kept subject must match."""
    folder = Path(work_dir) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    ids, subjects = frame["id"].tolist(), frame["subject"].tolist()
    rows_of = {name: [int(i) for i in rows] for name, rows in frame.groupby("subject", sort=False).indices.items()}
    scores: dict[int, list[float]] = {}
    for name, rows in rows_of.items():
        saved = _read(folder / file_name(name), name, [ids[i] for i in rows], precision)
        if saved is not None:
            scores.update(zip(rows, saved))
    kept = sorted(scores)
    todo = [i for i in range(len(frame)) if i not in scores]
    if kept:
        log.info("resuming: %d of %d subjects (%d questions) were scored by an earlier attempt (%s)",
                 len({subjects[i] for i in kept}), len(rows_of), len(kept), folder)
    mode = None
    if todo:
        got: dict[str, dict[int, list[float]]] = {}

        def on_scored(position: int, row: list[float]) -> None:
            i = todo[position]
            name = subjects[i]
            got.setdefault(name, {})[i] = list(row)
            if len(got[name]) == len(rows_of[name]):
                rows = rows_of[name]
                write_kept(folder / file_name(name), {"subject": name, "ids": [ids[r] for r in rows],
                                                  "scores": [got[name][r] for r in rows], **precision})

        fresh, mode = score(frame.iloc[todo].reset_index(drop=True), on_scored)
        scores.update(zip(todo, fresh))
    return [scores[i] for i in range(len(frame))], mode, kept


def file_name(subject: str) -> str:
    """A file name of its own for any subject string (MMLU's are plain; a user's data may not be)."""
    plain = re.sub(r"[^A-Za-z0-9_.-]", "_", subject)[:80].lstrip(".")  # never hidden, never ".."
    return f"{plain}-{hashlib.sha256(subject.encode()).hexdigest()[:10]}.json"


def _read(path: Path, subject: str, ids: list[str], precision: dict[str, str]) -> list[list[float]] | None:
    saved = read_kept(path, f"subject {subject}", lambda saved: _problem(saved, subject, ids, precision))
    return None if saved is None else saved["scores"]


def read_kept(path: Path, what: str, problem: Callable[[object], str | None]) -> dict | None:
    """A record kept by `write_kept`, or None (missing; unreadable or `problem(record)` says why
    not: a warning that `what` is scored again)."""
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        log.warning("%s is unreadable (%s); scoring %s again", path, error, what)
        return None
    why = problem(saved)
    if why:
        log.warning("not reusing %s: %s; scoring %s again", path, why, what)
        return None
    return saved


def _problem(saved, subject: str, ids: list[str], precision: dict[str, str]) -> str | None:
    if not isinstance(saved, dict) or saved.get("subject") != subject:
        return "it holds another subject"
    if saved.get("ids") != ids:
        return "its question ids are not the ones this evaluation asks"
    if precision_problem(saved, precision):
        return precision_problem(saved, precision)
    rows = saved.get("scores")
    if not isinstance(rows, list) or len(rows) != len(ids) or not all(
            isinstance(row, list) and row and all(isinstance(v, (int, float)) for v in row) for row in rows):
        return "its scores are not one list of numbers per question"
    return None


def precision_problem(saved: dict, precision: dict[str, str]) -> str | None:
    """Why scores kept with `saved`'s device kind, dtype and GPTQ kernel do not fit a run with
    `precision` (a file kept before the kernel was recorded has none: it fits a model without one)."""
    for key, value in precision.items():
        if saved.get(key) != value:
            return f"it was scored with {key} {saved.get(key)!r}, this run has {value!r}"
    return None


def write_kept(path: Path, record: dict) -> None:
    """Write `record` as JSON by rename: a crash leaves the old file or the new one, never half of one."""
    # A NaN score is written as JSON's NaN, which Python reads back: the runner's finiteness check,
    # not this file, decides what a NaN means.
    write_text_atomic(path, json.dumps(record) + "\n")
