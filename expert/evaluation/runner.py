"""`evaluate(...)`: score one model (plus optional LoRA adapter) on one benchmark.

Reads the benchmark's Parquet (data contract: id, prompt, answer, choices; MMLU adds
subject, category), scores every choice by log-likelihood (see scoring.py), and writes
into `out_dir`:
- metrics.json: the numbers (see metrics.py) plus scoring mode and timing; MMLU adds
  num_shots, from the formatter's stats.json beside the data (None where there is none);
- predictions.parquet: id, gold, prediction, correct, loglik_<choice> per choice;
- pubmedqa_preds.json (PubMedQA): {pmid: label} for exactly the evaluated ids, the
  submission format of the PubMedQA authors' evaluation.py;
- mmlu.png (MMLU): accuracy per subject;
- report.md: the tables, with published results for comparison.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from expert.errors import ConfigError, DataError, ModelError, did_you_mean
from expert.evaluation.config import EvalConfig
from expert.evaluation.loading import load_model
from expert.evaluation.metrics import mmlu_metrics, pubmedqa_metrics
from expert.evaluation.plots import plot_mmlu
from expert.evaluation.report import benchmark_title, write_report
from expert.evaluation.resume import resumable, score_keeping_subjects
from expert.evaluation.scoring import encode_questions, model_max_length, one_pass, score_questions
from expert.fanout import FanOut

BENCHMARKS = ("pubmedqa", "mmlu")
_COLUMNS = {"pubmedqa": ["id", "prompt", "answer", "choices"],
            "mmlu": ["id", "prompt", "answer", "choices", "subject", "category"]}

Progress = Callable[[int, int], None]
log = logging.getLogger(__name__)


def evaluate(config: EvalConfig, benchmark: str, model_dir: Path, data_dir: Path, out_dir: Path,
             adapter_dir: Path | None = None, progress: Progress | None = None,
             run_name: str | None = None, fan_out: FanOut | None = None, work_dir: Path | None = None) -> dict:
    """Score `model_dir` (+ `adapter_dir`) on `benchmark`, write the outputs, return metrics.

    `fan_out`: score in independent pieces run through it (see pieces.py); the outputs are
    those of one process, except metrics["timing"], which then lists the pieces.
    `work_dir`: a folder that outlives a crash; MMLU keeps each finished subject's scores there,
    and a rerun with the same folder scores only the rest (resume.py).
    """
    benchmark = check_benchmark(benchmark)
    frame = load_questions(config, benchmark, Path(data_dir))
    if fan_out is None:
        scores, mode, timing = _score_here(config, benchmark, Path(model_dir), adapter_dir, frame, progress,
                                           work_dir)
    else:
        from expert.evaluation.pieces import score_in_pieces

        scores, mode, timing = score_in_pieces(config, benchmark, Path(model_dir), Path(data_dir), adapter_dir,
                                               frame, fan_out, progress)
    check_finite(frame["id"].tolist(), scores, timing.get("dtype", config.dtype))
    choices = frame["choices"].tolist()
    predictions = predict(choices, scores)
    metrics = _metrics(benchmark, frame, predictions)
    if benchmark == "mmlu":
        metrics["num_shots"] = mmlu_num_shots(Path(data_dir))
    else:
        metrics["split"] = config.pubmedqa_split
    metrics["scoring"] = mode
    metrics["timing"] = timing
    run_name = run_name or Path(model_dir).name + (" + LoRA" if adapter_dir else "")
    _write_outputs(Path(out_dir), benchmark, frame, predictions, scores, metrics, run_name,
                   {"model": Path(model_dir).name, "adapter": Path(adapter_dir).name if adapter_dir else "none"})
    return metrics


def _score_here(config: EvalConfig, benchmark: str, model_dir: Path, adapter_dir: Path | None,
                frame: pd.DataFrame, progress: Progress | None,
                work_dir: Path | None = None) -> tuple[list[list[float]], dict, dict]:
    loaded = load_model(model_dir, adapter_dir and Path(adapter_dir), config.device, config.dtype,
                        config.gptq_kernel)
    dtype = str(loaded.dtype).replace("torch.", "")
    started = time.perf_counter()
    kept: list[int] = []
    if work_dir is not None and resumable(benchmark, config.prefix_cache, frame):
        def score(rows: pd.DataFrame, on_scored):
            return score_frame(loaded.model, loaded.tokenizer, rows, config, benchmark, progress, on_scored)

        scores, mode, kept = score_keeping_subjects(frame, Path(work_dir), loaded.precision, score)
        mode = _with_kept(mode, loaded, frame.iloc[kept], config)
    else:
        scores, mode = score_frame(loaded.model, loaded.tokenizer, frame, config, benchmark, progress)
    seconds = time.perf_counter() - started
    timing = {"scoring_s": round(seconds, 3), "questions_per_s": round((len(frame) - len(kept)) / seconds, 3),
              "device": str(loaded.device), "dtype": dtype}
    if loaded.gptq_kernel:
        timing["gptq_kernel"] = loaded.gptq_kernel
    if kept:  # the speed above is of the questions scored now, in this attempt
        timing["resumed_questions"] = len(kept)
    return scores, mode, timing


def _with_kept(mode: dict | None, loaded, kept: pd.DataFrame, config: EvalConfig) -> dict:
    """The scoring mode of the whole evaluation, when `kept` questions were scored by an earlier attempt."""
    if mode is None:  # every subject came from the earlier attempt
        mode = {"one_pass_questions": 0, "prefix_cache": True, "batch_size": config.batch_size,
                "max_length": config.max_length or model_max_length(loaded.model, loaded.tokenizer)}
    if len(kept):
        questions = encode_questions(loaded.tokenizer, kept["prompt"].tolist(),
                                     [[" " + c for c in choices] for choices in kept["choices"]])
        mode = {**mode, "one_pass_questions": mode["one_pass_questions"] + sum(one_pass(q) for q in questions)}
    return mode


def predict(choices: list[list[str]], scores: list[list[float]]) -> list[str]:
    """The highest-scoring choice of each question (the first one on a tie). Scores must be finite
    (check_finite): max() never prefers a NaN, so an all-NaN row would quietly give the first choice."""
    return [options[max(range(len(row)), key=row.__getitem__)] for options, row in zip(choices, scores)]


def check_finite(ids: list[str], scores: list[list[float]], dtype: str) -> None:
    """Refuse NaN or infinite log-likelihoods: predicted from, they turn into plausible numbers (the
    first choice everywhere scores PubMedQA's majority baseline). `dtype`: what the model scored in;
    float16's narrow range (an activation overflow) is the usual cause, which bfloat16 avoids."""
    bad = [qid for qid, row in zip(ids, scores) if not all(math.isfinite(s) for s in row)]
    if not bad:
        return
    shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
    raise ModelError(f"{len(bad)} of {len(ids)} questions got a non-finite (NaN or infinite) log-likelihood when "
                     f"scored in {dtype} (ids {shown}), so no answer can be picked for them. Set eval.dtype: "
                     "bfloat16 or float32: a float16 activation overflow is the likely cause (eval.dtype 'auto' "
                     "takes a checkpoint's float16 on a GPU). If it persists in float32, the model or adapter "
                     "holds non-finite weights (e.g. from a diverged training run)")


def check_benchmark(name: str) -> str:
    if name not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {name!r}" + did_you_mean(name, BENCHMARKS)
                          + f"; known benchmarks: {', '.join(BENCHMARKS)}")
    return name


def _check_benchmark_of(data_dir: Path, frame: pd.DataFrame, benchmark: str) -> None:
    """Refuse one benchmark's data scored as the other's (MMLU's columns include PubMedQA's)."""
    try:
        stated = json.loads((data_dir / "stats.json").read_text()).get("benchmark")
    except (OSError, ValueError, AttributeError):
        stated = None
    columns = set(frame.columns)
    found = stated if stated in BENCHMARKS else "mmlu" if "subject" in columns else \
        "pubmedqa" if "contexts" in columns else None
    if found is not None and found != benchmark:
        raise DataError(f"{data_dir} holds {found} data, not {benchmark}: give the folder written by "
                        f"`expert format {benchmark}`, or score it with --benchmark {found}")


def load_questions(config: EvalConfig, benchmark: str, data_dir: Path) -> pd.DataFrame:
    """The benchmark's evaluation split, checked and subset as the config says."""
    split = config.pubmedqa_split if benchmark == "pubmedqa" else "test"
    path = data_dir / f"{split}.parquet"
    if not path.is_file():
        raise DataError(f"{path} does not exist; format the data first: `expert format {benchmark} --source ... "
                        f"--out {data_dir}` (or the pipeline's format_{benchmark} stage)")
    frame = pd.read_parquet(path)
    _check_benchmark_of(data_dir, frame, benchmark)
    missing = [c for c in _COLUMNS[benchmark] if c not in frame.columns]
    if missing:
        raise DataError(f"{path} lacks column(s) {', '.join(missing)}; re-run the data stage to rewrite it")
    frame["id"] = frame["id"].astype(str)
    frame["choices"] = [list(c) for c in frame["choices"]]
    if benchmark == "mmlu":
        frame = _subset_mmlu(config, frame, path)
    bad = [i for i, a, c in zip(frame["id"], frame["answer"], frame["choices"]) if a not in c]
    if bad:
        raise DataError(f"{path}: answer not among the choices for id(s) {', '.join(bad[:5])}")
    if frame.empty:
        raise DataError(f"{path} holds no questions to evaluate")
    return frame.reset_index(drop=True)


def _subset_mmlu(config: EvalConfig, frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    if config.mmlu_subjects is not None:
        known = sorted(frame["subject"].unique())
        for name in config.mmlu_subjects:
            if name not in known:
                raise ConfigError(f"eval.mmlu_subjects: unknown subject {name!r} in {path}"
                                  + did_you_mean(name, known)
                                  + f"; {len(known)} subjects are available, e.g. {', '.join(known[:5])}")
        frame = frame[frame["subject"].isin(config.mmlu_subjects)]
    if config.mmlu_max_per_subject is not None:
        frame = frame.groupby("subject", sort=False).head(config.mmlu_max_per_subject)
    return frame


def mmlu_num_shots(data_dir: Path) -> int | None:
    """The shots of the formatted MMLU data, as the mmlu formatter recorded them in stats.json;
    None for data without one (Parquet written by other means): the report then says so."""
    path = data_dir / "stats.json"
    if not path.is_file():
        return None
    try:
        shots = json.loads(path.read_text()).get("num_shots")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise DataError(f"{path} is not a JSON object ({exc}); re-run the data stage to rewrite it") from None
    if shots is not None and (type(shots) is not int or shots < 0):
        raise DataError(f"{path}: field 'num_shots' must be a whole number >= 0, got {shots!r}; "
                        "re-run the data stage to rewrite it")
    return shots


def score_frame(model, tokenizer, frame: pd.DataFrame, config: EvalConfig, benchmark: str,
                progress: Progress | None = None,
                on_scored: Callable[[int, list[float]], None] | None = None) -> tuple[list[list[float]], dict]:
    """Log-likelihood of every choice of every row; plus how the scoring ran.

    `on_scored(row, scores)` as each row is done (in the scoring's order, not the frame's)."""
    from tqdm.auto import tqdm

    questions = encode_questions(tokenizer, frame["prompt"].tolist(),
                                 [[" " + c for c in choices] for choices in frame["choices"]])
    groups = None
    if benchmark == "mmlu" and config.prefix_cache:
        key = "prefix" if "prefix" in frame.columns else "subject"
        groups = list(frame.groupby(key, sort=False).indices.values())
    max_length = config.max_length or model_max_length(model, tokenizer)
    total = len(questions)
    bar = tqdm(total=total, desc=f"eval {benchmark}", unit="q")
    done = [0]

    def tick(question: int, row: list[float]) -> None:
        if on_scored is not None:
            on_scored(question, row)
        done[0] += 1
        bar.update(1)
        # ~100 calls at most: each may become a Prefect artifact update.
        if progress is not None and (done[0] == total or done[0] % max(1, total // 100) == 0):
            progress(done[0], total)

    try:
        scores = score_questions(model, questions, max_length=max_length, batch_size=config.batch_size,
                                 groups=groups, on_question_done=tick)
    finally:
        bar.close()
    mode = {"one_pass_questions": sum(one_pass(q) for q in questions), "prefix_cache": groups is not None,
            "max_length": max_length, "batch_size": config.batch_size}
    if mode["one_pass_questions"] < total:
        log.warning("%s: %d of %d questions have a choice of several tokens with this tokenizer; they were "
                    "scored with one forward pass per choice (same scores, slower)", benchmark,
                    total - mode["one_pass_questions"], total)
    return scores, mode


def _metrics(benchmark: str, frame: pd.DataFrame, predictions: list[str]) -> dict:
    if benchmark == "pubmedqa":
        return pubmedqa_metrics(frame["answer"].tolist(), predictions)
    return mmlu_metrics(frame["subject"].tolist(), frame["category"].tolist(), frame["answer"].tolist(),
                        predictions)


def _write_outputs(out_dir: Path, benchmark: str, frame: pd.DataFrame, predictions: list[str],
                   scores: list[list[float]], metrics: dict, run_name: str, details: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame({"id": frame["id"], "gold": frame["answer"], "prediction": predictions})
    if benchmark == "mmlu":
        table.insert(1, "subject", frame["subject"])
        table.insert(2, "category", frame["category"])
    table["correct"] = table["gold"] == table["prediction"]
    for c, choice in enumerate(frame["choices"].iloc[0]):
        table[f"loglik_{choice}"] = [row[c] for row in scores]
    table.to_parquet(out_dir / "predictions.parquet", index=False)
    if benchmark == "pubmedqa":
        preds = dict(zip(frame["id"], predictions))
        (out_dir / "pubmedqa_preds.json").write_text(json.dumps(preds, indent=1) + "\n")
    else:
        plot_mmlu(metrics, out_dir / "mmlu.png", title=f"{benchmark_title(metrics)}, {run_name}")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    timing = metrics["timing"]
    write_report(out_dir / "report.md", metrics, run_name,
                 {**details, "questions": metrics["n"], "scoring time": f"{timing['scoring_s']:.1f} s "
                  f"({timing['questions_per_s']:.2f} questions/s on {timing['device']}, {timing['dtype']}"
                  + (f"; {len(timing['pieces'])} pieces, model loads included" if "pieces" in timing else "")
                  + ")"})
