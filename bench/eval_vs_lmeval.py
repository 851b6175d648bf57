"""Benchmark: expert.evaluation against lm-evaluation-harness on the same questions.

Both score the same prompts (the contract Parquet's `prompt` column, which already holds
MMLU's 5 shots) with the same model, dtype, batch size and thread count, one after the
other in the same run. lm-eval reads the questions through a local task config (JSONL
files, `output_type: multiple_choice`, `target_delimiter: " "`, 0 shots) and runs in its
own virtual environment: it brings many packages (datasets, evaluate, sacrebleu, ...) this
project does not need:

    python3 -m venv .venv-lmeval
    .venv-lmeval/bin/pip install torch==2.13.0 lm-eval transformers==5.24.0 accelerate peft==0.21.2
    LMEVAL_PYTHON=.venv-lmeval/bin/python .venv/bin/python bench/eval_vs_lmeval.py \
        --model MODEL_DIR --data FORMATTED_DATA_DIR

FORMATTED_DATA_DIR holds pubmedqa/test.parquet and mmlu/test.parquet (the data stage's
output). With `--adapter ADAPTER_DIR` both sides score through that LoRA adapter (PEFT), as the
pipeline scores the expert (lm-eval: HFLM's `peft=`), and with `--dtype bfloat16` in bf16, as the
pipeline scores on a CPU with native bf16 matmuls. The result, bench/results/eval_vs_lmeval.json
(eval_vs_lmeval_adapter.json, ..._bfloat16.json with those options), gives questions per second of
both (ours: the whole `evaluate` call, model load included; lm-eval: `simple_evaluate` on an
already loaded model; ratio > 1 means ours is faster), per benchmark,
and the quality check: how many predictions are identical and the largest difference in
a choice's log-likelihood.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
TASKS = {"pubmedqa": "expert_local_pubmedqa", "mmlu": "expert_local_mmlu"}
# Scored first and untimed by both sides: imports, lazy initialisation and first kernels.
WARMUP = ("warmup", "expert_local_warmup")
TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {jsonl}
test_split: test
output_type: multiple_choice
doc_to_text: prompt
doc_to_choice: choices
doc_to_target: gold_index
target_delimiter: " "
metric_list:
  - metric: acc
metadata:
  version: 1
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="Hugging Face model folder")
    p.add_argument("--data", type=Path, help="folder with pubmedqa/test.parquet and mmlu/test.parquet")
    p.add_argument("--adapter", type=Path, help="a LoRA adapter folder (PEFT) that both sides score through "
                   "(lm-eval: HFLM's peft=)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="both sides' weights (bfloat16: what eval.dtype auto takes on a CPU with native bf16)")
    p.add_argument("--lmeval-python", default=os.environ.get("LMEVAL_PYTHON"),
                   help="python of the lm-eval venv (default: $LMEVAL_PYTHON)")
    p.add_argument("--pubmedqa-n", type=int, default=40, help="first N PubMedQA test questions")
    p.add_argument("--mmlu-subjects", default="anatomy,high_school_government_and_politics,philosophy",
                   help="comma-separated MMLU subjects")
    p.add_argument("--mmlu-per-subject", type=int, default=20, help="first N questions of each subject")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", type=Path, help="result file (default: results/eval_vs_lmeval.json; with "
                   "--adapter and --dtype bfloat16 the name gains _adapter and _bfloat16)")
    p.add_argument("--lmeval-driver", type=Path, help=argparse.SUPPRESS)  # internal: run inside the lm-eval venv
    return p.parse_args(argv)


# ---------------------------------------------------------------- the lm-eval side (its own venv)

def lmeval_driver(job: Path) -> None:
    """Runs under the lm-eval venv: score the job's tasks, write per-question log-likelihoods."""
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    spec = json.loads(job.read_text())
    lm = HFLM(pretrained=spec["model"], peft=spec["adapter"], dtype=spec["dtype"], device="cpu",
              batch_size=spec["batch_size"])
    manager = TaskManager(include_path=spec["task_dir"])
    out = {"version": lm_eval.__version__, "threads": torch.get_num_threads(), "benchmarks": {}}
    lm_eval.simple_evaluate(model=lm, tasks=[WARMUP[1]], task_manager=manager, num_fewshot=0, bootstrap_iters=0)
    for benchmark, task in spec["tasks"].items():
        started = time.perf_counter()
        result = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, num_fewshot=0,
                                         log_samples=True, bootstrap_iters=0)
        seconds = time.perf_counter() - started
        logliks = {s["doc"]["id"]: [float(r[0]) for r in s["filtered_resps"]] for s in result["samples"][task]}
        out["benchmarks"][benchmark] = {"seconds": seconds, "logliks": logliks,
                                        "acc": result["results"][task]["acc,none"]}
    Path(spec["result"]).write_text(json.dumps(out))


# ---------------------------------------------------------------- our side and the comparison

def subsets(args: argparse.Namespace, work: Path) -> dict[str, Path]:
    """Write the compared questions as contract Parquet (ours) and JSONL (lm-eval)."""
    import pandas as pd

    pubmedqa = pd.read_parquet(args.data / "pubmedqa" / "test.parquet").head(args.pubmedqa_n)
    mmlu = pd.read_parquet(args.data / "mmlu" / "test.parquet")
    subjects = args.mmlu_subjects.split(",")
    mmlu = mmlu[mmlu["subject"].isin(subjects)].groupby("subject", sort=False).head(args.mmlu_per_subject)
    dirs = {}
    for name, frame in ((WARMUP[0], pubmedqa.head(2)), ("pubmedqa", pubmedqa), ("mmlu", mmlu)):
        folder = work / name
        folder.mkdir()
        frame.to_parquet(folder / "test.parquet", index=False)
        rows = frame[["id", "prompt", "choices", "answer"]].copy()
        rows["choices"] = [list(c) for c in rows["choices"]]
        rows["gold_index"] = [c.index(a) for c, a in zip(rows["choices"], rows["answer"])]
        rows.to_json(folder / "questions.jsonl", orient="records", lines=True, force_ascii=False)
        dirs[name] = folder
    return dirs


def run_ours(args: argparse.Namespace, dirs: dict[str, Path], work: Path) -> dict:
    import pandas as pd

    from expert.evaluation import EvalConfig, evaluate

    config = EvalConfig(device="cpu", dtype=args.dtype, batch_size=args.batch_size)
    evaluate(config, "pubmedqa", args.model, dirs[WARMUP[0]], work / "ours_warmup", adapter_dir=args.adapter)
    out = {}
    for name, folder in dirs.items():
        if name == WARMUP[0]:
            continue
        started = time.perf_counter()
        metrics = evaluate(config, name, args.model, folder, work / f"ours_{name}", adapter_dir=args.adapter)
        # The whole call (model load, outputs, plot, report included): lm-eval's timed part holds no model load.
        seconds = time.perf_counter() - started
        table = pd.read_parquet(work / f"ours_{name}" / "predictions.parquet")
        columns = [c for c in table.columns if c.startswith("loglik_")]
        out[name] = {"seconds": seconds, "scoring_s": metrics["timing"]["scoring_s"],
                     "acc": metrics.get("accuracy", metrics.get("average")),
                     "logliks": {i: list(map(float, row)) for i, row in zip(table["id"], table[columns].to_numpy())}}
    return out


def run_theirs(args: argparse.Namespace, dirs: dict[str, Path], work: Path) -> dict:
    task_dir = work / "lmeval_tasks"
    task_dir.mkdir()
    for name, folder in dirs.items():
        task = dict([WARMUP], **TASKS)[name]
        (task_dir / f"{task}.yaml").write_text(TASK_YAML.format(task=task, jsonl=folder / "questions.jsonl"))
    job = work / "lmeval_job.json"
    result = work / "lmeval_result.json"
    job.write_text(json.dumps({"model": str(args.model), "adapter": args.adapter and str(args.adapter),
                               "dtype": args.dtype,
                               "batch_size": args.batch_size, "task_dir": str(task_dir),
                               "tasks": TASKS, "result": str(result)}))
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run([args.lmeval_python, __file__, "--lmeval-driver", str(job)], check=True, env=env)
    return json.loads(result.read_text())


def compare(ours: dict, theirs: dict) -> dict:
    """Per benchmark: speed of both, identical predictions, largest log-likelihood gap."""
    per, total_q, ours_s, theirs_s, same = {}, 0, 0.0, 0.0, 0
    for name, mine in ours.items():
        other = theirs["benchmarks"][name]
        ids = list(mine["logliks"])
        argmax = lambda row: max(range(len(row)), key=row.__getitem__)  # noqa: E731
        identical = sum(argmax(mine["logliks"][i]) == argmax(other["logliks"][i]) for i in ids)
        gap = max(abs(a - b) for i in ids for a, b in zip(mine["logliks"][i], other["logliks"][i]))
        per[name] = {"questions": len(ids), "ours_s": round(mine["seconds"], 2), "ours_scoring_only_s": mine["scoring_s"],
                     "lmeval_s": round(other["seconds"], 2),
                     "ratio": round(other["seconds"] / mine["seconds"], 2), "predictions_identical": identical,
                     "max_abs_loglik_diff": gap, "accuracy_ours": mine["acc"], "accuracy_lmeval": other["acc"]}
        total_q += len(ids)
        ours_s += mine["seconds"]
        theirs_s += other["seconds"]
        same += identical
    return {"per_benchmark": per, "questions": total_q, "ours_s": ours_s, "theirs_s": theirs_s, "identical": same}


def versions(theirs: dict) -> dict:
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "lm_eval": theirs["version"], "torch_threads": torch.get_num_threads(), "lmeval_threads": theirs["threads"]}


def default_out(args: argparse.Namespace) -> Path:
    """results/eval_vs_lmeval[_adapter][_bfloat16].json: each setting keeps its own result."""
    return RESULTS / ("eval_vs_lmeval" + ("_adapter" if args.adapter else "")
                      + ("_bfloat16" if args.dtype != "float32" else "") + ".json")


def command(args: argparse.Namespace) -> str:
    """The command line, with this machine's paths replaced by placeholders."""
    return ("python bench/eval_vs_lmeval.py --model MODEL_DIR --data DATA_DIR --lmeval-python LMEVAL_PYTHON "
            + ("--adapter ADAPTER_DIR " if args.adapter else "")
            + (f"--dtype {args.dtype} " if args.dtype != "float32" else "") +
            f"--pubmedqa-n {args.pubmedqa_n} --mmlu-subjects {args.mmlu_subjects} "
            f"--mmlu-per-subject {args.mmlu_per_subject} --batch-size {args.batch_size}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.lmeval_driver:
        return lmeval_driver(args.lmeval_driver)
    if args.model is None or args.data is None or args.lmeval_python is None:
        sys.exit("--model, --data and --lmeval-python (or $LMEVAL_PYTHON) are required; see the module docstring")
    args.out = args.out or default_out(args)
    with tempfile.TemporaryDirectory(prefix="eval_vs_lmeval_") as tmp:
        work = Path(tmp)
        dirs = subsets(args, work)
        ours = run_ours(args, dirs, work)
        theirs = run_theirs(args, dirs, work)
    c = compare(ours, theirs)
    result = {
        "metric": f"scoring throughput, PubMedQA {args.pubmedqa_n} + MMLU 5-shot "
                  f"{c['per_benchmark']['mmlu']['questions']} questions, {args.model.name}"
                  f"{' + LoRA adapter' if args.adapter else ''}, {args.dtype}, batch {args.batch_size}",
        "unit": "questions/s",
        "peer": {"name": f"lm-evaluation-harness {theirs['version']} (HFLM)", "value": round(c["questions"] / c["theirs_s"], 3)},
        "ours": {"value": round(c["questions"] / c["ours_s"], 3)},
        "ratio": round(c["theirs_s"] / c["ours_s"], 3),
        "quality": {"predictions_identical": c["identical"], "questions": c["questions"],
                    "per_benchmark": c["per_benchmark"]},
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the end (shared)",
        "versions": versions(theirs),
        "command": command(args),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
