"""Benchmark: the quantize stage vs gptqmodel used directly with its own defaults.

Both sides quantize the same model with the same tokenized calibration samples (PubMedQA train
texts, seeded, cut to --max-length tokens) and save the result; each runs in a fresh process, so
its wall time (calibration tokenizing + load + GPTQ + save; imports excluded) and peak RSS
(VmHWM, with the RSS after imports beside it) are its own. Ours is the quantize stage,
`expert.quantize.quantize` (gptqmodel's API with our settings, see expert/quantize/gptq.py), with
the perplexity comparison switched off; the peer is `GPTQModel.load` + `quantize` + `save` with
gptqmodel's default QuantizeConfig, except group_size 64 when 128 does not divide the model
(SmolLM2-135M: 576). Quality checks: how many saved tensors are bit-identical, gptqmodel's mean
per-module GPTQ loss of each, and the perplexity of both outputs and the base on --perplexity dev
texts.

    python bench/quantize.py --model /path/to/SmolLM2-135M-Instruct --data /path/to/pubmedqa_formatted \
        --out bench/results/quantize_smollm2_cpu.json

Each side runs --rounds times (3 by default), alternating which goes first; the median run of
each side is the figure and every run is kept in the result.

--checkpoint adds the stage's GPTQ layer checkpoints (expert/quantize/checkpoint.py), which apply
where the model is streamed from disk, as on every GPU: ours streamed with and without them
(--rounds each, alternating), the disk they take, and a run killed with SIGKILL past half its
layers then run again, whose weights must equal the uninterrupted run's (result key `checkpoint`).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

from common import (alternating_rounds, describe_machine, median_run, peak_rss_kib, print_child_result, run_child,  # bench/ is on sys.path
                    work_dir, write_result)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    args = _parser().parse_args()
    if args.child:
        print_child_result(_child(args))
        return
    with work_dir("bench-quantize-", args.work) as work:
        # Each side's median run is the figure; round 1's outputs are the ones compared below
        # (tensors, perplexity).
        runs = alternating_rounds(args.rounds, ("peer", "ours"), lambda side, round_: _run_child(
            args, side, work / (side if round_ == 0 else f"{side}-{round_}")))
        sides = {side: median_run(rows) for side, rows in runs.items()}
        result = _result(args, sides)
        result["runs"] = runs
        result["identical_tensors"] = _identical_tensors(work / "ours", work / "peer")
        if args.perplexity:
            result["perplexity"] = _perplexities(args, work)
        if args.checkpoint:
            result["checkpoint"] = _checkpoint(args, work)
    write_result(args.out, result)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face folder of the base model")
    p.add_argument("--data", required=True, help="formatted PubMedQA folder (train.parquet, dev.parquet)")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--perplexity", type=int, default=32,
                   help="dev texts to score both outputs on (the quality check; 0 skips)")
    p.add_argument("--rounds", type=int, default=3, help="runs per side, alternating which goes first (median)")
    p.add_argument("--work", help="folder for the two quantized models, kept (default: a temp folder, removed)")
    p.add_argument("--out", default=str(ROOT / "bench/results/quantize_smollm2_cpu.json"))
    p.add_argument("--checkpoint", action="store_true",
                   help="also measure the stage's GPTQ layer checkpoints on a streamed model: time, memory, "
                        "disk, and a kill + resume (result key `checkpoint`)")
    p.add_argument("--child", choices=("ours", "peer"), help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    p.add_argument("--child-streamed", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-work", help=argparse.SUPPRESS)
    p.add_argument("--child-kill-after", type=int, default=0, help=argparse.SUPPRESS)
    return p


def _checkpoint(args, work: Path) -> dict:
    """Ours streamed with and without layer checkpoints, then killed after half its layers and resumed."""
    from expert.artifacts import folder_bytes
    from expert.quantize.gptq import block_count

    def streamed(side: str, round_: int) -> dict:
        extra = ["--child-work", str(work / f"ck-{round_}")] if side == "checkpointed" else []
        return _run_child(args, "ours", work / f"{side}-{round_}", "--child-streamed", *extra)

    runs = alternating_rounds(args.rounds, ("streamed", "checkpointed"), streamed, label="checkpoint round")
    layers = block_count(Path(args.model))
    # Killed as layer k is quantized, before it is committed: the rerun starts at layer k (1-based).
    kill_after = layers // 2 + 1
    killed = subprocess.run(_child_command(args, "ours", work / "killed", "--child-streamed", "--child-work",
                                           str(work / "ck-resume"), "--child-kill-after", str(kill_after)),
                            capture_output=True, text=True, env=_child_env("ours"))
    if killed.returncode != -signal.SIGKILL:
        raise SystemExit(f"the run to kill ended otherwise (exit {killed.returncode}):\n{killed.stderr[-4000:]}")
    resumed = _run_child(args, "ours", work / "resumed", "--child-streamed", "--child-work", str(work / "ck-resume"))
    median = {side: median_run(rows) for side, rows in runs.items()}
    return {
        "time_ratio": median["checkpointed"]["seconds"] / median["streamed"]["seconds"],  # > 1: their cost
        "peak_rss_mib": {side: row["peak_rss_mib"] for side, row in median.items()},
        "disk_mib": folder_bytes(work / "ck-0") / 2**20,
        "identical_tensors": _identical_tensors(work / "checkpointed-0", work / "streamed-0"),
        "layers": layers, "killed_after_layers": kill_after,
        "resumed": {"seconds": resumed["seconds"], "first_layer_quantized": resumed["first_layer_quantized"],
                    "identical_tensors": _identical_tensors(work / "resumed", work / "streamed-0")},
        "runs": runs,
    }


def _run_child(args, side: str, out: Path, *extra: str) -> dict:
    return run_child(_child_command(args, side, out, *extra), side, env=_child_env(side))[0]


def _child_command(args, side: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, __file__, "--child", side, "--child-out", str(out), "--model", args.model,
            "--data", args.data, "--samples", str(args.samples), "--max-length", str(args.max_length),
            "--group-size", str(args.group_size), *extra]


def _child_env(side: str) -> dict[str, str]:
    env = dict(os.environ)
    # gptqmodel cannot quantize on a 2-core machine without it; ours sets it by itself if unset.
    if side == "peer":
        env.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, ((os.cpu_count() or 1) + 1) // 2)))
    env["TERM"] = "dumb"  # no progress bars redrawn into the pipe on either side (ours draws none there anyway)
    return env


def _child(args) -> dict:
    import gptqmodel  # noqa: F401 (imports are not timed; the stage imports these lazily)
    import optimum.gptq  # noqa: F401
    import torch  # noqa: F401
    from transformers import AutoTokenizer

    out = Path(args.child_out)
    imports_kib = peak_rss_kib()
    ticks: list[int] = []
    if args.child == "ours":
        from expert.quantize import QuantizeConfig, gptq, quantize

        if args.child_streamed:  # as gptqmodel runs on every GPU: block by block from disk
            gptq.offload_to_disk = lambda model_dir: True

        def progress(done: int, total: int) -> None:
            ticks.append(done)  # 1: before GPTQ; then 1 + the layers quantized
            if args.child_kill_after and done == 1 + args.child_kill_after:
                os.kill(os.getpid(), signal.SIGKILL)

        start = time.perf_counter()
        config = QuantizeConfig(group_size=args.group_size, num_samples=args.samples,
                                max_length=args.max_length, perplexity_samples=0)
        quantize(config, Path(args.model), Path(args.data), out, progress,
                 work_dir=Path(args.child_work) if args.child_work else None)
        seconds = time.perf_counter() - start
    else:
        from gptqmodel import GPTQModel, QuantizeConfig as PeerConfig

        from expert.quantize.calibration import task_texts, tokenize_samples

        start = time.perf_counter()
        tok = AutoTokenizer.from_pretrained(args.model)
        samples = tokenize_samples(task_texts(Path(args.data) / "train.parquet", args.samples, 0),
                                   tok, args.max_length)
        calibration = [{k: v[0].tolist() for k, v in s.items()} for s in samples]
        model = GPTQModel.load(args.model, PeerConfig(group_size=args.group_size))
        model.quantize(calibration, tokenizer=tok)
        model.save(str(out))
        seconds = time.perf_counter() - start
    peak_kib = peak_rss_kib()
    return {"seconds": seconds, "peak_rss_mib": peak_kib / 1024, "rss_after_imports_mib": imports_kib / 1024,
            "gptq_loss_mean": _mean_loss(out / "quant_log.csv"),
            "first_layer_quantized": ticks[1] - 1 if len(ticks) > 1 else None}  # 1-based; > 1 after a resume


def _mean_loss(path: Path) -> float | None:
    """Mean per-module GPTQ loss from the quant_log.csv gptqmodel saves beside the weights."""
    import csv

    if not path.is_file():
        return None
    with path.open() as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f) if row.get("loss")]
    return sum(losses) / len(losses) if losses else None


def _identical_tensors(ours: Path, peer: Path) -> dict:
    """How many saved tensors (qweight, scales, zeros, norms, embeddings) are bit-identical."""
    import torch
    from safetensors.torch import load_file

    a, b = (load_file(str(next(folder.glob("*.safetensors")))) for folder in (ours, peer))
    same = sum(1 for name in a if name in b and a[name].shape == b[name].shape and torch.equal(a[name], b[name]))
    return {"identical": same, "ours": len(a), "peer": len(b)}


def _perplexities(args, work: Path) -> dict:
    from expert.modeling import load_model
    from expert.quantize.calibration import heldout_texts
    from expert.quantize.report import perplexity

    texts = heldout_texts(Path(args.data), args.perplexity, 0)
    result = {"texts": len(texts)}
    for name, folder in (("unquantized", Path(args.model)), ("ours", work / "ours"), ("peer", work / "peer")):
        model, tok = load_model(folder)
        result[name] = perplexity(model, tok, texts, args.max_length)["perplexity"]
        del model
    return result


def _result(args, sides: dict) -> dict:
    import gptqmodel
    import optimum.version
    import torch
    import transformers

    return {
        "metric": f"GPTQ quantization wall time (calibration + load + quantize + save), {args.samples} "
                  f"calibration samples of up to {args.max_length} tokens, bits 4, group size {args.group_size}; "
                  f"median of {args.rounds} run(s) per side, alternating which side goes first",
        "unit": "s",
        "peer": {"name": f"gptqmodel {gptqmodel.__version__} GPTQModel.load + quantize + save, default "
                         f"QuantizeConfig (group_size {args.group_size})", "value": sides["peer"]["seconds"]},
        "ours": {"value": sides["ours"]["seconds"]},
        "ratio": sides["peer"]["seconds"] / sides["ours"]["seconds"],  # > 1: ours is faster
        "peak_rss_mib": {side: sides[side]["peak_rss_mib"] for side in ("ours", "peer")},
        "rss_after_imports_mib": {side: sides[side]["rss_after_imports_mib"] for side in ("ours", "peer")},
        "model_weights_mib": _weights_mib(Path(args.model)),
        "gptq_loss_mean": {side: sides[side]["gptq_loss_mean"] for side in ("ours", "peer")},
        "machine": describe_machine(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "optimum": optimum.version.__version__,
                     "gptqmodel": gptqmodel.__version__},
        "command": _command(args),
        "date": datetime.date.today().isoformat(),
    }


def _weights_mib(folder: Path) -> float:
    from expert.quantize.report import weights_bytes

    return weights_bytes(folder) / 2**20


def _command(args) -> str:
    """The command line with this machine's paths replaced by what they stand for."""
    threads = os.environ.get("OMP_NUM_THREADS")
    cmd = f"OMP_NUM_THREADS={threads} " if threads else ""
    cmd += "python bench/quantize.py --model SMOLLM2_135M_INSTRUCT_DIR --data PUBMEDQA_FORMATTED_DIR"
    for flag, value, default in (("--rounds", args.rounds, 3), ("--samples", args.samples, 128),
                                 ("--max-length", args.max_length, 512),
                                 ("--group-size", args.group_size, 64), ("--perplexity", args.perplexity, 32)):
        cmd += f" {flag} {value}" if value != default else ""
    return cmd + (" --checkpoint" if args.checkpoint else "")


if __name__ == "__main__":
    main()
