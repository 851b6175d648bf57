"""How training and evaluation time grow with data: seconds per epoch vs training examples, and
seconds vs PubMedQA questions.

Training: `expert.train.train` on the first N examples of the formatted train split (one epoch,
no dev loss, one checkpoint at the end) of --model (the quantize stage's 4-bit folder, as the
pipeline trains it, or any model folder), for each N of --train-sizes, with the default preset's
LoRA settings (r 8 on q_proj, v_proj; micro-batch 4, effective batch 8) and --max-length tokens.
Evaluation: `expert.evaluation.evaluate` on the first N questions of the test split, for each N of
--eval-sizes. Each measurement runs in a fresh process (so none profits from another's warm
caches); the time of each is split into its fixed part (model load) and the part that grows with
the data, and the JSON records the seconds per example of each size, so linear growth shows as a
flat column. The format's "peer" is the smallest size, scaled linearly: ratio > 1 means the
largest size cost less per example than the smallest (fixed costs amortised).

    OMP_NUM_THREADS=1 .venv/bin/python bench/scale.py --model QUANTIZED_MODEL_DIR --data PUBMEDQA_FORMATTED_DIR

Without --model / --data it takes the newest artifacts/quantize/*/ and artifacts/format_pubmedqa/*/
of this checkout (`make run` makes them). Writes bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

from common import command_line, describe_machine, newest_artifact, print_child_result, run_child, work_dir, write_result  # bench/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    args = _parser().parse_args()
    if args.child:
        print_child_result(_child(args))
        return
    model, data = Path(args.model or newest_artifact("quantize")), Path(args.data or newest_artifact("format_pubmedqa"))
    with work_dir("bench-scale-") as work:
        train = [_run_child(args, "train", n, model, data, work) for n in _sizes(args.train_sizes)]
        evaluation = [_run_child(args, "eval", n, model, data, work) for n in _sizes(args.eval_sizes)]
    result = _result(args, train, evaluation)
    write_result(args.out, result)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model folder to train and evaluate (default: newest artifacts/quantize/*)")
    p.add_argument("--data", help="formatted PubMedQA folder (default: newest artifacts/format_pubmedqa/*)")
    p.add_argument("--train-sizes", default="8,16,32", help="training examples per run")
    p.add_argument("--eval-sizes", default="20,40,80", help="PubMedQA test questions per run")
    p.add_argument("--max-length", type=int, default=128, help="training tokens per example, at most")
    p.add_argument("--out", default=str(ROOT / "bench/results/scale.json"))
    p.add_argument("--child", choices=("train", "eval"), help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    return p


def _sizes(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _run_child(args, kind: str, n: int, model: Path, data: Path, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--n", str(n), "--model", str(model), "--data", str(data),
           "--max-length", str(args.max_length), "--work", str(work / f"{kind}-{n}")]
    row, _ = run_child(cmd, f"{kind} {n}")
    print(f"{kind} {n}: {row}", file=sys.stderr, flush=True)
    return row


def _subset(data: Path, split: str, n: int, out: Path) -> Path:
    """A data folder holding the first `n` rows of `split` (the runs read nothing else)."""
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    table = pq.read_table(data / f"{split}.parquet")
    if table.num_rows < n:
        raise SystemExit(f"{data / split}.parquet has {table.num_rows} rows, fewer than {n}")
    pq.write_table(table.slice(0, n), out / f"{split}.parquet")
    return out


def _child(args) -> dict:
    import torch  # noqa: F401 (imports are not timed)

    work = Path(args.work)
    if args.child == "train":
        from expert.train import TrainConfig, train

        data = _subset(Path(args.data), "train", args.n, work / "data")
        config = TrainConfig(epochs=1, dev_loss=False, lora_r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                             micro_batch_size=4, effective_batch_size=8, warmup_steps=2, learning_rate=2e-4,
                             max_length=args.max_length, save_every_steps=10_000)
        start = time.perf_counter()
        train(config, Path(args.model), data, work / "out", work / "work")
        total = time.perf_counter() - start
        summary = json.loads((work / "out" / "summary.json").read_text())
        return {"examples": args.n, "seconds": total, "loop_seconds": summary["train_seconds"],
                "tokens": summary["tokens"], "steps": summary["steps"]}
    from expert.evaluation import EvalConfig, evaluate

    data = _subset(Path(args.data), "test", args.n, work / "data")
    start = time.perf_counter()
    metrics = evaluate(EvalConfig(batch_size=8), "pubmedqa", Path(args.model), data, work / "out")
    total = time.perf_counter() - start
    return {"questions": args.n, "seconds": total, "loop_seconds": metrics["timing"]["scoring_s"]}


def _table(rows: list[dict], unit: str) -> list[dict]:
    return [{**row, f"loop_seconds_per_{unit}": row["loop_seconds"] / row[unit + "s"],
             "fixed_seconds": row["seconds"] - row["loop_seconds"]} for row in rows]


def _result(args, train: list[dict], evaluation: list[dict]) -> dict:
    import torch
    import transformers

    train_t, eval_t = _table(train, "example"), _table(evaluation, "question")
    small, large = train_t[0], train_t[-1]
    # Peer: the smallest run scaled linearly to the largest size (what linear growth would cost).
    linear = small["seconds"] * large["examples"] / small["examples"]
    return {
        "metric": f"training seconds for one epoch of {large['examples']} PubMedQA examples (of up to "
                  f"{args.max_length} tokens), against {small['examples']} examples' time scaled linearly",
        "unit": "s",
        "peer": {"name": f"linear scaling of the {small['examples']}-example run", "value": linear},
        "ours": {"value": large["seconds"]},
        "ratio": linear / large["seconds"],
        "training": train_t,
        "evaluation": eval_t,
        "training_loop_growth": _growth(train_t, "examples"),
        "evaluation_loop_growth": _growth(eval_t, "questions"),
        "machine": describe_machine(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "command": _command(args),
        "date": datetime.date.today().isoformat(),
    }


def _growth(rows: list[dict], unit: str) -> dict:
    """Loop time of the largest size over the smallest, beside the size ratio (1:1 is linear)."""
    first, last = rows[0], rows[-1]
    return {"size_ratio": last[unit] / first[unit], "loop_time_ratio": last["loop_seconds"] / first["loop_seconds"]}


def _command(args) -> str:
    threads = os.environ.get("OMP_NUM_THREADS")
    return command_line("scale.py", args, _parser(), {"model": "QUANTIZED_MODEL_DIR", "data": "PUBMEDQA_FORMATTED_DIR"},
                        prefix=f"OMP_NUM_THREADS={threads} " if threads else "")


if __name__ == "__main__":
    main()
