"""Benchmark: scoring a GPTQ model on the CPU with each of gptqmodel's CPU kernels (eval.gptq_kernel).

Each (eval.dtype, eval.gptq_kernel) pair scores the same PubMedQA split with `expert eval`, in a
process of its own (a fresh allocator, and gptqmodel's per-process choices), --rounds times in
turn. The figure is each pair's median questions/s of the scoring loop (the load excluded, as
`metrics.json` times it). The peer is what gptqmodel picks by itself in bf16 (its int4 kernel,
TorchAtenLinear: `torch_aten`); ours is EXPERT's `auto` in bf16 (gptqmodel's torch kernel keeping
its dequantized weights, where they fit). Quality check: every pair's predictions against `auto`
in the same dtype (kernels round differently, so a near-tie may flip) and its accuracy.

    python bench/gptq_kernels.py --model artifacts/quantize/KEY --data artifacts/format_pubmedqa/KEY \
        --out bench/results/gptq_kernels_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

from common import command_line, describe_machine, newest_artifact, work_dir, write_result  # bench/ is on sys.path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PAIRS = "bfloat16:auto,bfloat16:torch_aten,bfloat16:torch_fused,float32:auto,float32:torch_aten,float32:torch_fused"


def main() -> None:
    parser = _parser()
    args = parser.parse_args()
    model = Path(args.model) if args.model else newest_artifact("quantize")
    data = Path(args.data) if args.data else newest_artifact("format_pubmedqa")
    pairs = [tuple(pair.split(":")) for pair in args.pairs.split(",")]
    for dtype, _ in pairs:
        if (dtype, "auto") not in pairs:
            raise SystemExit(f"--pairs: {dtype} has no {dtype}:auto to compare predictions with")
    if not {("bfloat16", "auto"), ("bfloat16", "torch_aten")} <= set(pairs):
        raise SystemExit("--pairs must hold bfloat16:auto (ours) and bfloat16:torch_aten (the peer)")
    runs: dict[str, list[dict]] = {f"{d}:{k}": [] for d, k in pairs}
    with work_dir("bench-gptq-kernels-", args.work) as work:
        for round_ in range(args.rounds):
            order = pairs if round_ % 2 == 0 else pairs[::-1]  # a shared machine's load drifts
            for dtype, kernel in order:
                out = work / f"{dtype}-{kernel}-{round_}"
                runs[f"{dtype}:{kernel}"].append(_score(args, model, data, dtype, kernel, out))
                print(f"round {round_ + 1}: {dtype} {kernel}: {runs[f'{dtype}:{kernel}'][-1]['questions_per_s']} q/s",
                      flush=True)
        rows = _rows(runs, work)
    write_result(args.out, _result(args, parser, rows, runs))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a GPTQ model folder (default: newest artifacts/quantize/*)")
    p.add_argument("--data", help="formatted PubMedQA folder (default: newest artifacts/format_pubmedqa/*)")
    p.add_argument("--split", default="dev", choices=("dev", "test"),
                   help="PubMedQA split scored (eval.pubmedqa_split)")
    p.add_argument("--pairs", default=DEFAULT_PAIRS,
                   help="comma-separated DTYPE:KERNEL (eval.dtype:eval.gptq_kernel); each dtype needs DTYPE:auto")
    p.add_argument("--rounds", type=int, default=2, help="runs per pair, the order reversed every other round")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    p.add_argument("--work", help="folder for the evaluations, kept (default: a temp folder, removed)")
    p.add_argument("--out", default=str(ROOT / "bench/results/gptq_kernels_cpu.json"))
    return p


def _score(args, model: Path, data: Path, dtype: str, kernel: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "expert.cli", "eval", "--model", str(model), "--benchmark", "pubmedqa", "--data",
           str(data), "--out", str(out), "--no-resume", "--set", "device=cpu", "--set", f"dtype={dtype}",
           "--set", f"gptq_kernel={kernel}", "--set", f"pubmedqa_split={args.split}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{dtype}:{kernel} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {"questions_per_s": metrics["timing"]["questions_per_s"], "layers": metrics["timing"].get("gptq_kernel"),
            "accuracy": metrics["accuracy"], "n": metrics["n"]}


def _rows(runs: dict[str, list[dict]], work: Path) -> dict[str, dict]:
    """Each pair's median speed, its layers, accuracy, and predictions against its dtype's auto
    (round 1's outputs)."""
    import pandas as pd

    def predictions(pair: str) -> pd.Series:
        dtype, kernel = pair.split(":")
        frame = pd.read_parquet(work / f"{dtype}-{kernel}-0" / "predictions.parquet")
        return frame.set_index("id")["prediction"]

    rows = {}
    for pair, pair_runs in runs.items():
        mine, auto = predictions(pair), predictions(pair.split(":")[0] + ":auto")
        rows[pair] = {"questions_per_s": statistics.median(r["questions_per_s"] for r in pair_runs),
                      "layers": pair_runs[0]["layers"], "accuracy": pair_runs[0]["accuracy"],
                      "same_predictions_as_auto": int((mine == auto.loc[mine.index]).sum()), "n": pair_runs[0]["n"]}
    return rows


def _result(args, parser, rows: dict[str, dict], runs: dict[str, list[dict]]) -> dict:
    import gptqmodel
    import torch

    peer, ours = rows["bfloat16:torch_aten"], rows["bfloat16:auto"]
    result = {
        "metric": f"PubMedQA {args.split} scoring of a GPTQ model on the CPU, questions/s of the scoring loop "
                  f"(model load excluded), median of {args.rounds} run(s) per eval.dtype:eval.gptq_kernel pair, "
                  f"{args.threads} threads",
        "unit": "questions/s",
        "peer": {"name": "gptqmodel's own kernel choice in bf16 (eval.gptq_kernel torch_aten: TorchAtenLinear)",
                 "value": peer["questions_per_s"]},
        "ours": {"value": ours["questions_per_s"]},
        "ratio": ours["questions_per_s"] / peer["questions_per_s"],
        "pairs": rows,
        "runs": runs,
        "machine": describe_machine(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "gptqmodel": gptqmodel.__version__},
        "command": command_line("gptq_kernels.py", args, parser, {"model": "GPTQ_MODEL_DIR",
                                                                  "data": "PUBMEDQA_FORMATTED_DIR"},
                                prefix=f"OMP_NUM_THREADS={args.threads} "),
        "date": datetime.date.today().isoformat(),
    }
    # Fastest pair per dtype: what eval.gptq_kernel to set on this CPU.
    result["fastest"] = {dtype: max((p for p in rows if p.startswith(dtype + ":")), key=lambda p: rows[p]
                                    ["questions_per_s"]) for dtype in {p.split(":")[0] for p in rows}}
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
