"""Checkpoint selection: score every saved adapter on the dev split, keep the best.

The dev split (PubMedQA fold k, 50 questions) is scored with the evaluator's own
log-likelihood scoring, so "best on dev" means best under exactly the protocol used on the
test split, which this stage never reads. The base model is loaded once; adapters are
swapped in one after another. Ties go to the earlier step (less training, same dev score);
a NaN score (a diverged checkpoint) loses to every number.
Given a fan-out, each checkpoint is scored as an independent piece instead (one model load
each), with the same rows. In one process each checkpoint's row is kept in the stage's work
folder as it is scored, so a rerun after a crash scores only the checkpoints still missing.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Callable, Literal

from pydantic import Field

from expert.config import StageConfig
from expert.errors import ExpertError
from expert.fanout import FanOut, Piece

METRICS = ("accuracy", "macro_f1", "dev_loss")
ROW_FIELDS = ("step", *METRICS, "n", "path")  # one checkpoint's row of scores.json (path left out there)
KEPT_ROWS = "dev-scores"  # in the stage's work folder: each scored checkpoint's row, for a rerun after a crash
log = logging.getLogger(__name__)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class SelectConfig(StageConfig):
    metric: Literal["accuracy", "macro_f1", "dev_loss"] = Field(
        "accuracy", description="dev score to maximise (accuracy, macro_f1) or minimise (dev_loss: the "
        "negative log-likelihood of the gold answer ' {answer}' as the evaluator scores it, summed over its "
        "tokens (no EOS), averaged over the dev questions; not the training loss, which is per token and "
        "includes EOS)")


def select_checkpoint(config: SelectConfig, eval_config, model_dir: Path, train_dir: Path, data_dir: Path,
                      out_dir: Path, progress: Callable[[int, int], None] | None = None,
                      fan_out: FanOut | None = None, work_dir: Path | None = None) -> dict:
    from expert.train import list_checkpoints

    checkpoints = list_checkpoints(Path(train_dir))
    if not checkpoints:
        raise ExpertError(f"{train_dir} holds no complete checkpoint to select from; rerun the train stage")
    dev_config = eval_config.model_copy(update={"pubmedqa_split": "dev"})
    rows = score_checkpoints(dev_config, Path(model_dir), checkpoints, Path(data_dir), progress, fan_out, work_dir)
    best = pick_best(rows, config.metric)
    out_dir = Path(out_dir)
    adapter = out_dir / "adapter"
    adapter.mkdir(parents=True)
    for name in ADAPTER_FILES:
        shutil.copy2(Path(best["path"]) / name, adapter / name)
    table = [{k: v for k, v in row.items() if k != "path"} for row in rows]
    (out_dir / "scores.json").write_text(json.dumps(table, indent=2) + "\n")
    summary = {"metric": config.metric, "step": best["step"], "score": best[config.metric],
               "checkpoints": len(rows), "dev_questions": best["n"]}
    (out_dir / "selection.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_scores(table, config.metric, best["step"], out_dir / "dev_scores.png")
    return summary


def score_checkpoints(dev_config, model_dir: Path, checkpoints: list[tuple[int, Path]], data_dir: Path,
                      progress=None, fan_out: FanOut | None = None, work_dir: Path | None = None) -> list[dict]:
    """One dev row per checkpoint, in order; `fan_out`: each checkpoint an independent piece.

    `work_dir` (one process): each checkpoint's row is kept there as it is scored, and a rerun
    after a crash scores only the checkpoints still missing (every checkpoint is scored on its
    own, so a kept row is the row an uninterrupted run computes)."""
    if fan_out is not None:
        return _score_in_pieces(dev_config, model_dir, checkpoints, data_dir, fan_out, progress)
    from peft import PeftModel

    from expert.evaluation.loading import load_model
    from expert.evaluation.resume import write_kept
    from expert.evaluation.runner import load_questions, score_frame
    from expert.modeling import known_warnings_muted

    frame = load_questions(dev_config, "pubmedqa", data_dir)
    loaded = load_model(model_dir, None, dev_config.device, dev_config.dtype, dev_config.gptq_kernel)
    precision = loaded.precision  # a kept row is reused only where device kind, dtype and kernel agree
    kept_dir = Path(work_dir) / KEPT_ROWS if work_dir is not None else None
    if kept_dir is not None:
        kept_dir.mkdir(parents=True, exist_ok=True)
    model, current, rows = None, None, []
    for i, (step, path) in enumerate(checkpoints):
        row = _kept_row(kept_dir, step, path, frame, precision) if kept_dir is not None else None
        if row is None:
            name = f"step{step}"
            if model is None:
                with known_warnings_muted():
                    model = PeftModel.from_pretrained(loaded.model, path, adapter_name=name, is_trainable=False)
            else:
                model.load_adapter(path, adapter_name=name, is_trainable=False)
            model.set_adapter(name)
            if current is not None:
                model.delete_adapter(current)
            current = name
            model.to(loaded.device).eval()
            scores, _ = score_frame(model, loaded.tokenizer, frame, dev_config, "pubmedqa")
            row = _row(step, path, frame, scores)
            if kept_dir is not None:
                write_kept(kept_dir / f"step{step}.json", {"step": step, "path": str(path),
                                                           "ids": frame["id"].tolist(), **precision, "row": row})
        rows.append(row)
        if progress:
            progress(i + 1, len(checkpoints))
    return rows


def _kept_row(folder: Path, step: int, path: Path, frame, precision: dict[str, str]) -> dict | None:
    """The row an earlier attempt kept for this checkpoint, when it was scored as this run would."""
    from expert.evaluation.resume import precision_problem, read_kept

    def problem(saved) -> str | None:
        if not isinstance(saved, dict) or saved.get("step") != step or saved.get("path") != str(path):
            return f"it holds another checkpoint than step {step} at {path}"
        if saved.get("ids") != frame["id"].tolist():
            return "its dev question ids are not the ones this selection asks"
        if not isinstance(saved.get("row"), dict) or set(saved["row"]) != set(ROW_FIELDS):
            return f"its row does not hold {', '.join(ROW_FIELDS)}"
        return precision_problem(saved, precision)

    saved = read_kept(folder / f"step{step}.json", f"checkpoint step {step}", problem)
    if saved is None:
        return None
    log.info("step %d: dev scores kept by an earlier attempt (%s)", step, folder)
    return saved["row"]


def score_checkpoint(dev_config, model_dir: str, step: int, path: str, data_dir: str) -> dict:
    """One checkpoint's dev row, with its own model load: a piece of a fanned-out selection."""
    from peft import PeftModel

    from expert.evaluation.loading import load_model
    from expert.evaluation.runner import load_questions, score_frame
    from expert.modeling import known_warnings_muted

    frame = load_questions(dev_config, "pubmedqa", Path(data_dir))
    loaded = load_model(Path(model_dir), None, dev_config.device, dev_config.dtype, dev_config.gptq_kernel)
    # Loaded as the single-process selection loads it: the base, then this adapter on top.
    with known_warnings_muted():
        model = PeftModel.from_pretrained(loaded.model, path, adapter_name=f"step{step}", is_trainable=False)
    model.to(loaded.device).eval()
    scores, _ = score_frame(model, loaded.tokenizer, frame, dev_config, "pubmedqa")
    return _row(step, Path(path), frame, scores)


def _score_in_pieces(dev_config, model_dir: Path, checkpoints: list[tuple[int, Path]], data_dir: Path,
                     fan_out: FanOut, progress=None) -> list[dict]:
    pieces = [Piece(f"dev score step {step}", score_checkpoint,
                    {"dev_config": dev_config, "model_dir": str(model_dir), "step": step, "path": str(path),
                     "data_dir": str(data_dir)}) for step, path in checkpoints]
    done = [0]

    def finished(_i: int) -> None:
        done[0] += 1
        if progress:
            progress(done[0], len(pieces))

    return fan_out(pieces, on_done=finished)


def _row(step: int, path: Path, frame, scores: list[list[float]]) -> dict:
    from expert.evaluation.metrics import pubmedqa_metrics
    from expert.evaluation.runner import predict

    choices = frame["choices"].tolist()
    preds = predict(choices, scores)
    gold = frame["answer"].tolist()
    # scores: each choice's log-likelihood summed over its tokens, so this is a per-question NLL
    nll = [-s[opts.index(g)] for g, opts, s in zip(gold, choices, scores)]
    metrics = pubmedqa_metrics(gold, preds)
    row = {"step": step, "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
           "dev_loss": sum(nll) / len(nll), "n": len(gold), "path": str(path)}
    if not all(math.isfinite(s) for choice_scores in scores for s in choice_scores):
        # A diverged checkpoint: predict() would answer its NaN questions with the first choice,
        # a plausible accuracy that could win. NaN scores never win (pick_best).
        row.update(accuracy=math.nan, macro_f1=math.nan, dev_loss=math.nan)
    return row


def pick_best(rows: list[dict], metric: str) -> dict:
    """Highest accuracy / macro-F1, or lowest dev loss; ties to the earlier step; NaN never wins."""
    # Left out, not compared: nothing compares greater than NaN, so max() would keep a NaN it met first.
    scored = [r for r in rows if not math.isnan(r[metric])]
    if not scored:
        steps = ", ".join(str(r["step"]) for r in rows)
        raise ExpertError(f"select.metric {metric} is NaN on the dev split for every checkpoint (steps {steps}): "
                          "training diverged, so no adapter is worth selecting. Train again with a lower "
                          "train.learning_rate (or train.precision: float32)")
    sign = -1.0 if metric == "dev_loss" else 1.0
    return max(sorted(scored, key=lambda r: r["step"]), key=lambda r: sign * r[metric])


def plot_scores(rows: list[dict], metric: str, best_step: int, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in ("accuracy", "macro_f1"):
        ax.plot(steps, [r[name] for r in rows], marker="o", label=f"dev {name}")
    ax.set_xlabel("optimizer step")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("dev score")
    ax.set_ylim(0, 1)
    loss_ax = ax.twinx()
    loss_ax.plot(steps, [r["dev_loss"] for r in rows], color="grey", linestyle="--", marker=".", label="dev loss")
    loss_ax.set_ylabel("dev loss (gold answer NLL per question)")
    ax.axvline(best_step, color="green", alpha=0.4, label=f"selected: step {best_step} ({metric})")
    lines = ax.get_legend_handles_labels()[0] + loss_ax.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + loss_ax.get_legend_handles_labels()[1]
    ax.legend(lines, labels, loc="lower right", fontsize=8)
    ax.set_title("Checkpoint selection on the dev split")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
