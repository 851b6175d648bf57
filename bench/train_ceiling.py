"""How fast could LoRA training on this CPU be? The matmul ceiling behind train_vs_trainer.py.

The CPU training target asks for 2x the peer's useful tokens/s. This script asks whether 2x is
reachable at all at a given precision, by timing only the work no implementation can skip: the
linear layers' matmuls. Both sides keep the base weights frozen, so a linear layer costs its
forward (x @ W^T) and its input gradient (dy @ W), and no weight gradient. Per useful token:
- ours: every decoder layer's linears, plus the output head on the labelled (answer) tokens only;
- the peer: the same decoder layers, plus the output head on every token (the model's own loss).
Each matmul is timed at the benchmark's shapes (micro-batch x the mean padded width as rows), in
float32 and in bf16. The ceiling is 1 / (that matmul time per useful token): the speed a side
would reach if attention, norms, activations, LoRA, the loss and the optimizer cost nothing.
Against the peer's speed measured by train_vs_trainer.py (its committed result), the ceiling
says which ratio the matmuls still allow; the measured speeds say how close each side runs to it.

    OMP_NUM_THREADS=2 .venv/bin/python bench/train_ceiling.py \\
        --model SMOLLM2_135M_INSTRUCT_DIR --data PUBMEDQA_FORMATTED_DIR

Defaults as train_vs_trainer.py (the same seeded 64 training examples, micro-batch 4, max_length 384).
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

from common import command_line, describe_machine, newest_artifact, work_dir, write_result  # bench/ is on sys.path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PRECISIONS = {"float32": "float32", "bf16": "bfloat16"}


def main() -> None:
    args = _parser().parse_args()
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from train_vs_trainer import _encoded, _subset

    torch.set_num_threads(args.threads)
    model_dir = Path(args.model or newest_artifact("import_model"))
    data_dir = Path(args.data or newest_artifact("format_pubmedqa"))
    with work_dir("bench-ceiling-") as work:
        subset = _subset(data_dir, work / "data", args.examples, 1, args.seed)
        encoded = _encoded(AutoTokenizer.from_pretrained(model_dir), subset, "train", args.max_length)
    lengths = sorted(encoded.lengths)
    shape = _batch_shape(lengths, [e.answer_tokens for e in encoded.examples], args.micro_batch)
    layer, head, layers = _linears(AutoConfig.from_pretrained(model_dir))
    measured = json.loads(Path(args.measured).read_text())
    result = {"metric": "matmul-only ceiling of LoRA training, useful tokens/s (frozen base: forward + "
                        "input gradient of every linear layer; attention, elementwise, loss and optimizer free)",
              "unit": "tokens/s", "batch": shape, "linear_shapes": {"decoder_layer": layer, "layers": layers,
                                                                    "head": head}}
    for name, dtype in PRECISIONS.items():
        result[name] = _ceilings(torch, getattr(torch, dtype), layer, head, layers, shape, args.seconds,
                                 _measured_speeds(measured, name))
    measured_from = Path(args.measured).resolve()
    measured_from = str(measured_from.relative_to(ROOT)) if measured_from.is_relative_to(ROOT) else "TRAIN_RESULT_JSON"
    result.update(machine=describe_machine(), versions={"torch": torch.__version__, "python": platform.python_version()},
                  measured_from=measured_from,
                  command=command_line("train_ceiling.py", args, _parser(), {"model": "SMOLLM2_DIR",
                                       "data": "PUBMEDQA_DIR", "measured": measured_from}),
                  date=datetime.date.today().isoformat())
    write_result(args.out, result)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="SmolLM2-135M-Instruct folder (default: newest artifacts/import_model/*)")
    p.add_argument("--data", help="formatted PubMedQA folder (default: newest artifacts/format_pubmedqa/*)")
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seconds", type=float, default=1.0, help="timing per matmul shape and precision")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    p.add_argument("--measured", default=str(ROOT / "bench/results/train_smollm2_cpu.json"),
                   help="train_vs_trainer.py's result: the measured speeds the ceilings are set against")
    p.add_argument("--out", default=str(ROOT / "bench/results/train_ceiling_cpu.json"))
    return p


def _batch_shape(lengths: list[int], answers: list[int], micro_batch: int) -> dict:
    """Rows per matmul and the work per useful token, for batches of neighbours in length (both
    sides group by length; the committed runs padded about 3%)."""
    chunks = [lengths[i:i + micro_batch] for i in range(0, len(lengths), micro_batch)]
    padded = sum(max(c) * len(c) for c in chunks)
    useful = sum(lengths)
    return {"examples": len(lengths), "useful_tokens": useful, "padded_tokens": padded,
            "rows_per_matmul": round(padded / len(chunks)), "padded_per_useful": padded / useful,
            "labelled_per_useful": sum(answers) / useful}


def _linears(config) -> tuple[list[list[int]], list[int], int]:
    """[in, out] of one decoder layer's linear layers, of the output head, and the layer count."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    first = model.get_decoder().layers[0]
    layer = [[m.in_features, m.out_features] for m in first.modules() if isinstance(m, torch.nn.Linear)]
    head = model.get_output_embeddings()
    return layer, [head.in_features, head.out_features], len(model.get_decoder().layers)


def _ceilings(torch, dtype, layer, head, layers, shape, seconds, measured) -> dict:
    rows = shape["rows_per_matmul"]
    per_row = {f"{i}x{o}": _linear_seconds(torch, dtype, rows, i, o, seconds) / rows for i, o in {*map(tuple, layer)}}
    body = layers * sum(per_row[f"{i}x{o}"] for i, o in layer)
    head_per_row = _linear_seconds(torch, dtype, rows, *head, seconds) / rows
    pad = shape["padded_per_useful"]
    ours = pad * body + shape["labelled_per_useful"] * head_per_row
    peer = pad * (body + head_per_row)
    out = {"seconds_per_row": {**per_row, "head": head_per_row},
           "ours_ceiling": 1 / ours, "peer_ceiling": 1 / peer, "peer_extra_matmul_work": peer / ours - 1}
    if measured:
        out["measured"] = measured
        out["ours_of_ceiling"] = measured["ours"] * ours
        out["peer_of_ceiling"] = measured["peer"] * peer
        out["ratio_measured"] = measured["ours"] / measured["peer"]
        out["ratio_ceiling"] = (1 / ours) / measured["peer"]  # ours at its ceiling against the peer as measured
    return out


def _linear_seconds(torch, dtype, rows: int, n_in: int, n_out: int, seconds: float) -> float:
    """Median time of one frozen linear layer's forward and input gradient at `rows` rows."""
    x = torch.randn(rows, n_in, dtype=dtype)
    w = torch.randn(n_out, n_in, dtype=dtype)
    dy = torch.randn(rows, n_out, dtype=dtype)
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 5:
        start = time.perf_counter()
        torch.nn.functional.linear(x, w)
        dy @ w
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _measured_speeds(result: dict, precision: str) -> dict | None:
    same = result.get("equal_precision", {}).get(precision)
    return {"ours": same["ours"], "peer": same["peer"]} if same else None


if __name__ == "__main__":
    main()
