"""Benchmark: LoRA training with `expert.train.train` vs transformers `Trainer` + PEFT, on the CPU.

Both sides train the same model (SmolLM2-135M-Instruct, float32) on the same PubMedQA training
examples (our formatted split, tokenized once by `expert.train.data.encode_split`, so the token
content is identical), with the same LoRA config (r 8, alpha 16, dropout 0.05 on q_proj, v_proj),
micro-batch, gradient accumulation, sequence cap, optimizer (AdamW), learning-rate schedule
(ours' warmup + linear decay, given to the Trainer too: transformers' own warmup starts at lr 0,
which wastes the first update of a short run and would tilt the quality check), gradient
clipping and number of optimizer steps (whole epochs, so both see every example equally often).
The peer is set up as a competent user would on this machine: `DataCollatorForSeq2Seq` padding
to each batch's longest, `train_sampling_strategy="group_by_length"` (Trainer's length grouping,
which QLoRA's recipe turns on), the model's own loss (`labels=`), and no gradient checkpointing
(memory is not short on the CPU; `--gradient-checkpointing 1` turns it on, as GPU recipes under
a memory cap do). The weights are float32 on both sides; the peer's matmuls run in float32
(Trainer's CPU default), ours under bf16 autocast where the CPU multiplies bf16 natively
(`train.precision: auto`). Like for like: `--ours-float32` adds ours in float32, `--peer-bf16`
the peer with `bf16=True` (bf16 autocast), both in the same run; `--ours-plain` adds ours
without lean activations (expert/train/lean.py), `--ours-compile` ours with `train.compile`.

The metric is useful (non-padding) tokens per second of the training loop: the same tokens on
both sides divided by the loop's time (Trainer: on_train_begin .. on_train_end; ours: the sum
of its step times, checkpoint writing excluded). `after_first_step` gives the same without each
side's first optimizer step, which pays one-off costs (compiling, first allocations): what a run
longer than these 8 steps approaches. The quality check is the answer-token loss on
the dev split of every final adapter and of the untrained model, by the same function: each
side must have moved it below the untrained model's, ours must be at most 2% above the peer's at
the same precision, and in float32 (the same computation on both sides) the two within 2%.

    OMP_NUM_THREADS=2 .venv/bin/python bench/train_vs_trainer.py \\
        --model SMOLLM2_135M_INSTRUCT_DIR --data PUBMEDQA_FORMATTED_DIR

Without --model / --data it takes the newest artifacts/import_model/*/ and
artifacts/format_pubmedqa/*/ of this checkout (`make run` makes them).
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

from common import command_line, describe_machine, newest_artifact, work_dir, write_result  # bench/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WARMUP = 2  # optimizer steps, both sides
QUALITY_TOLERANCE = 0.02  # relative, on the dev loss


def main() -> None:
    args = _parser().parse_args()
    import torch

    torch.set_num_threads(args.threads)
    model_dir = Path(args.model or newest_artifact("import_model", "expert import-model --source "
                                           "embedded:smollm2-135m-instruct --out DIR"))
    data_dir = Path(args.data or newest_artifact("format_pubmedqa", "expert format pubmedqa --source "
                                         "../shared/data/pubmedqa/ori_pqal.json --out DIR"))
    with work_dir("bench-train-") as work:
        subset = _subset(data_dir, work / "data", args.examples, args.dev_examples, args.seed)
        order = ("peer", "ours") + (("peer-bf16",) if args.peer_bf16 else ()) + \
            (("ours-plain",) if args.ours_plain else ()) + (("ours-float32",) if args.ours_float32 else ()) + \
            (("ours-compile",) if args.ours_compile else ())
        runs: dict[str, list[dict]] = {side: [] for side in order}
        for round_ in range(args.rounds):
            for side in order if round_ % 2 == 0 else order[::-1]:
                print(f"round {round_ + 1}: {side}", flush=True)
                if side.startswith("peer"):
                    row = _peer(args, model_dir, subset, work / f"{side}-{round_}", bf16=side == "peer-bf16")
                else:
                    row = _ours(args, model_dir, subset, work / f"{side}-{round_}", lean=side != "ours-plain",
                                precision="float32" if side == "ours-float32" else args.ours_precision,
                                compile_=side == "ours-compile")
                runs[side].append(row)
                print(json.dumps(row), flush=True)
        untrained = _untrained_dev_loss(args, model_dir, subset)
    result = _result(args, runs, untrained)
    write_result(args.out, result)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="SmolLM2-135M-Instruct folder (default: newest artifacts/import_model/*)")
    p.add_argument("--data", help="formatted PubMedQA folder (default: newest artifacts/format_pubmedqa/*)")
    p.add_argument("--examples", type=int, default=64, help="training examples (a seeded sample of train)")
    p.add_argument("--dev-examples", type=int, default=50, help="dev examples of the quality check")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--accumulation", type=int, default=2)
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--learning-rate", type=float, default=2e-4)
    p.add_argument("--gradient-checkpointing", type=int, default=0, choices=(0, 1),
                   help="the peer's setting: off (memory is not short on the CPU), 1 as GPU recipes under a cap")
    p.add_argument("--ours-checkpointing", default="auto", choices=("auto", "on", "off"),
                   help="ours: auto (off when memory allows, the default config), or as the peer")
    p.add_argument("--ours-precision", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="ours: train.precision (auto: bf16 autocast where the CPU has native bf16 matmuls)")
    p.add_argument("--ours-float32", action="store_true",
                   help="also run ours with precision float32, the peer's (Trainer's CPU default)")
    p.add_argument("--peer-bf16", action="store_true",
                   help="also run the peer with TrainingArguments(bf16=True): bf16 autocast, ours' precision")
    p.add_argument("--ours-plain", action="store_true",
                   help="also run ours without lean activations (expert.train.lean): what they add")
    p.add_argument("--ours-compile", action="store_true",
                   help="also run ours with train.compile (torch.compile of each decoder layer; its first step "
                        "compiles: see tokens_per_s_after_first_step)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    p.add_argument("--rounds", type=int, default=1, help="peer+ours pairs, alternating the order")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench/results/train_smollm2_cpu.json"))
    return p


def _subset(data_dir: Path, out: Path, n_train: int, n_dev: int, seed: int) -> Path:
    """train.parquet / dev.parquet holding a seeded sample of the formatted splits."""
    import numpy as np
    import pyarrow.parquet as pq

    out.mkdir(parents=True)
    for name, n in (("train", n_train), ("dev", n_dev)):
        table = pq.read_table(data_dir / f"{name}.parquet")
        pick = np.random.default_rng(seed).permutation(table.num_rows)[:n]
        pq.write_table(table.take(sorted(pick.tolist())), out / f"{name}.parquet")
    return out


def _config(args):
    from expert.train import TrainConfig

    return TrainConfig(lora_r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                       epochs=args.epochs, learning_rate=args.learning_rate, micro_batch_size=args.micro_batch,
                       effective_batch_size=args.micro_batch * args.accumulation, warmup_steps=WARMUP,
                       lr_scheduler="linear",
                       max_length=args.max_length,
                       gradient_checkpointing={"on": True, "off": False}.get(args.ours_checkpointing, "auto"),
                       seed=args.seed, save_every_steps=10**6, dev_loss=False)


def _encoded(tokenizer, data_dir: Path, split: str, max_length: int):
    from expert.train.data import encode_split, read_split

    return encode_split(tokenizer, read_split(data_dir / f"{split}.parquet"), max_length)


def _ours(args, model_dir: Path, data_dir: Path, work: Path, lean: bool = True, precision: str = "auto",
          compile_: bool = False) -> dict:
    from transformers import AutoTokenizer

    from expert.train import train

    config = _config(args).model_copy(update={"precision": precision, "lean_activations": lean, "compile": compile_})
    summary = train(config, model_dir, data_dir, work / "out", work / "work", device="cpu")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokens = sum(_encoded(tokenizer, data_dir, "train", args.max_length).lengths) * args.epochs
    written = json.loads((work / "out" / "summary.json").read_text())
    steps = [(r["tokens"], r["seconds"]) for r in map(json.loads, (work / "out" / "train_log.jsonl").read_text()
                                                      .splitlines()) if "loss" in r]
    return {"seconds": summary["train_seconds"], "tokens": tokens, "steps": summary["steps"],
            "memory_plan": written["memory"], "precision": written["precision"],
            "tokens_per_s": tokens / summary["train_seconds"], **_after_first_step(steps),
            "final_loss": summary["final_loss"],
            "dev_loss": _adapter_dev_loss(model_dir, work / "out" / "final", tokenizer, data_dir, args)}


def _after_first_step(steps: list[tuple[int, float]]) -> dict:
    """Throughput without each side's first optimizer step, which pays one-off costs (compiling, first
    allocations): what a longer run approaches. `steps`: (useful tokens, seconds) per step."""
    rest = steps[1:]
    return {"first_step_seconds": steps[0][1],
            "tokens_per_s_after_first_step": sum(t for t, _ in rest) / sum(s for _, s in rest) if rest else None}


def _peer(args, model_dir: Path, data_dir: Path, work: Path, bf16: bool = False) -> dict:
    """Trainer + PEFT, as its documentation has a user write it."""
    import math

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainerCallback, TrainingArguments)

    from expert.train.lora import lr_factor

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_set = _encoded(tokenizer, data_dir, "train", args.max_length)
    dataset = [{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels}
               for e in train_set.examples]
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, bias="none",
                                             target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    training = TrainingArguments(
        output_dir=str(work), per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.accumulation, num_train_epochs=args.epochs,
        learning_rate=args.learning_rate, max_grad_norm=1.0, weight_decay=0.0,
        gradient_checkpointing=bool(args.gradient_checkpointing),
        gradient_checkpointing_kwargs={"use_reentrant": False}, use_cpu=True, seed=args.seed,
        train_sampling_strategy="group_by_length", logging_steps=1, save_strategy="no", report_to=[],
        dataloader_num_workers=0, disable_tqdm=True, bf16=bf16)
    # Ours' schedule (the same AdamW): 2 warmup steps reaching the peak at the second update.
    steps = math.ceil(len(dataset) / (args.micro_batch * args.accumulation)) * args.epochs
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                                  weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, WARMUP, steps, "linear"))

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.start = time.perf_counter()
            self.ends = []

        def on_step_end(self, *a, **k):
            self.ends.append(time.perf_counter())

        def on_train_end(self, *a, **k):
            self.seconds = time.perf_counter() - self.start

    class CountingCollator(DataCollatorForSeq2Seq):
        """The useful tokens of each micro-batch, in the order the Trainer draws them."""
        counts: list = []

        def __call__(self, features, *a, **k):
            self.counts.append(sum(len(f["input_ids"]) for f in features))
            return super().__call__(features, *a, **k)

    clock = Clock()
    collator = CountingCollator(tokenizer, padding=True, label_pad_token_id=-100)
    collator.counts = []
    trainer = Trainer(model=model, args=training, train_dataset=dataset, callbacks=[clock],
                      processing_class=tokenizer, optimizers=(optimizer, schedule), data_collator=collator)
    trainer.train()
    adapter = work / "peer-adapter"
    model.save_pretrained(adapter)
    ticks = [clock.start, *clock.ends]
    per_step = [sum(collator.counts[i * args.accumulation:(i + 1) * args.accumulation]) for i in range(len(clock.ends))]
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    tokens = sum(train_set.lengths) * args.epochs
    return {"seconds": clock.seconds, "tokens": tokens, "steps": trainer.state.global_step,
            "tokens_per_s": tokens / clock.seconds,
            **_after_first_step([(n, b - a) for n, a, b in zip(per_step, ticks, ticks[1:])]),
            "tokens_counted": sum(collator.counts),  # by the collator: the per-step split's check
            "final_loss": losses[-1] if losses else None,
            "dev_loss": _adapter_dev_loss(model_dir, adapter, tokenizer, data_dir, args)}


def _untrained_dev_loss(args, model_dir: Path, data_dir: Path) -> float:
    """The quality check's baseline: the dev loss before any training."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    return _dev_loss(model, AutoTokenizer.from_pretrained(model_dir), data_dir, args)


def _adapter_dev_loss(model_dir: Path, adapter: Path, tokenizer, data_dir: Path, args) -> float:
    """The dev loss of a saved adapter on a fresh float32 base, without autocast: both sides the same way.

    Not the peer's trained model object itself: with bf16=True, accelerate leaves that model's
    forward wrapped in bf16 autocast after training, which would score the peer in bf16 and
    ours in float32.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    return _dev_loss(PeftModel.from_pretrained(base, adapter), tokenizer, data_dir, args)


def _dev_loss(model, tokenizer, data_dir: Path, args) -> float:
    """Mean answer-token loss on the dev sample: the same function for both adapters."""
    import torch

    from expert.train.data import collate, eval_batches
    from expert.train.step import answer_loss_sum

    dev = _encoded(tokenizer, data_dir, "dev", args.max_length)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in eval_batches(dev.lengths, 8):
            chosen = [dev.examples[i] for i in batch]
            total += float(answer_loss_sum(model, collate(chosen, tokenizer.eos_token_id), torch.device("cpu")))
            count += sum(e.answer_tokens for e in chosen)
    return total / count


def _result(args, runs: dict[str, list[dict]], untrained: float) -> dict:
    import peft
    import torch
    import transformers

    def mean(side, key):
        return sum(r[key] for r in runs[side]) / len(runs[side])

    peer, ours = mean("peer", "tokens_per_s"), mean("ours", "tokens_per_s")
    # Like for like: ours in float32 against the peer (float32), ours (bf16 autocast) against the
    # peer with bf16=True, where those sides ran.
    pairs = {"float32": ("ours-float32", "peer")}
    if runs.get("ours") and "bfloat16" in runs["ours"][0]["precision"]:
        pairs["bf16"] = ("ours", "peer-bf16")
    equal = {precision: {"ours": mean(o, "tokens_per_s"), "peer": mean(p, "tokens_per_s"),
                         "ratio": mean(o, "tokens_per_s") / mean(p, "tokens_per_s"),
                         "dev_loss": {"ours": mean(o, "dev_loss"), "peer": mean(p, "dev_loss")}}
             for precision, (o, p) in pairs.items() if runs.get(o) and runs.get(p)}
    # Every side trained (below the untrained model); ours no worse than the peer at the same
    # precision; and in float32, where both compute the same thing, the two agree.
    trained = all(mean(side, "dev_loss") < untrained for side in runs)
    same_precision = [(e["dev_loss"]["ours"], e["dev_loss"]["peer"]) for e in equal.values()] or \
        [(mean("ours", "dev_loss"), mean("peer", "dev_loss"))]
    not_worse = all(o <= (1 + QUALITY_TOLERANCE) * p for o, p in same_precision)
    agree = "float32" not in equal or abs(equal["float32"]["dev_loss"]["ours"] - equal["float32"]["dev_loss"]["peer"]) \
        <= QUALITY_TOLERANCE * equal["float32"]["dev_loss"]["peer"]
    return {
        "metric": f"LoRA training throughput, useful (non-padding) tokens/s of the training loop; "
                  f"SmolLM2-135M-Instruct float32, {args.examples} PubMedQA train examples x {args.epochs} epoch, "
                  f"micro-batch {args.micro_batch} x {args.accumulation} accumulation, max_length {args.max_length}, "
                  f"LoRA r8 q/v, gradient checkpointing: peer {'on' if args.gradient_checkpointing else 'off'}, "
                  f"ours {args.ours_checkpointing}; peer batches grouped by length; matmuls: peer float32"
                  f"{' (and bf16 autocast: peer-bf16)' if args.peer_bf16 else ''}, "
                  f"ours precision {args.ours_precision}, "
                  f"{args.threads} threads",
        "unit": "tokens/s",
        "peer": {"name": f"transformers {transformers.__version__} Trainer + PEFT {peft.__version__}, "
                         "DataCollatorForSeq2Seq padding", "value": peer},
        "ours": {"value": ours},
        "ratio": ours / peer,
        "dev_loss": {"peer": mean("peer", "dev_loss"), "ours": mean("ours", "dev_loss"), "untrained": untrained,
                     "examples": args.dev_examples, "what": "mean answer-token cross-entropy of the final adapter"},
        "quality_ok": trained and not_worse and agree,
        "quality_rule": f"every side below the untrained model's dev loss; ours at most {QUALITY_TOLERANCE:.0%} above "
                        f"the peer's at the same precision; in float32 the two within {QUALITY_TOLERANCE:.0%}",
        "equal_precision": equal,
        **{f"ours_{what}": {"tokens_per_s": mean(side, "tokens_per_s"), "dev_loss": mean(side, "dev_loss"),
                            "ratio": mean(side, "tokens_per_s") / peer}
           for side, what in (("ours-plain", "without_lean_activations"), ("ours-float32", "in_float32"),
                              ("ours-compile", "compiled")) if runs.get(side)},
        "after_first_step": _after_first(runs),
        "runs": runs,
        "machine": describe_machine(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__},
        "command": _command(args),
        "date": datetime.date.today().isoformat(),
    }


def _after_first(runs: dict[str, list[dict]]) -> dict:
    """Each side's throughput without its first optimizer step (compiling, first allocations), and
    the ratios at equal precision: what a run longer than this benchmark's few steps approaches."""
    def mean(side):
        values = [r["tokens_per_s_after_first_step"] for r in runs.get(side, [])]
        return sum(values) / len(values) if values and None not in values else None

    sides = {side: mean(side) for side in runs}
    pairs = {"float32": ("ours-float32", "peer"), "ours (default) vs peer (default)": ("ours", "peer"),
             "ours compiled vs peer (default)": ("ours-compile", "peer")}
    if runs.get("ours") and "bfloat16" in runs["ours"][0]["precision"]:  # else the CPU has no native bf16
        pairs |= {"bf16": ("ours", "peer-bf16"), "bf16, ours compiled": ("ours-compile", "peer-bf16")}
    ratios = {name: sides[o] / sides[p] for name, (o, p) in pairs.items() if sides.get(o) and sides.get(p)}
    return {"tokens_per_s": sides, "ratio": ratios,
            "what": "useful tokens/s of optimizer steps 2..N (each side's first step left out)"}


def _command(args) -> str:
    return command_line("train_vs_trainer.py", args, _parser(),
                        {"model": "SMOLLM2_135M_INSTRUCT_DIR", "data": "PUBMEDQA_FORMATTED_DIR"},
                        prefix=f"OMP_NUM_THREADS={args.threads} ", skip=("threads",))


if __name__ == "__main__":
    main()
