"""GPU benchmark: EXPERT's training step and MMLU scoring vs the standard stack, on one GPU, in one go.

    python3 bench/gpu.py --out DIR            # on a GPU machine, every case: over 10 minutes on an H100
    python3 bench/gpu.py --smoke --out DIR    # tiny shapes on the CPU: checks the script end to end

Random-weight models built layer by layer on the GPU (as ../shared/bench/peer_anchor.py does; values
do not change speed or memory), with the real length distributions of bench/data/pubmedqa_lengths.json
(SmolLM2 tokenizer counts; make it with bench/data/lengths.py):

Training, for the original job (33B-shaped LLaMA, NF4 4-bit base, LoRA r8 on q/v, effective batch 50)
and the 8B preset (Llama-3-8B shape, NF4, LoRA r16 on all linear layers, effective batch 48):
- peer: HF transformers + PEFT + bitsandbytes as a Trainer user runs it: PubMedQA-length examples
  grouped by length as Trainer's `group_by_length` does (`--peer-random-batches`: drawn at random, as
  the committed runs before 2026-11-27 were, with 17-27% padding), padded to each batch's longest
  (DataCollatorForSeq2Seq), `model(..., labels=)` loss, the preset's micro-batch (2 and 8), gradient
  checkpointing on (the 24 GiB cap);
- ours: expert.train's own pieces on the same model: `attach_lora` (with lean activations,
  expert/train/lean.py), `plan_memory` (micro-batch and checkpointing 'auto' under a 24 GiB limit),
  `BatchPlan` (length-bucketed batches) and `Runner.step` (loss on answer tokens only, one host sync
  per optimizer step); `--ours-plain` adds ours without the lean activations (side "ours-plain"),
  `--ours-divisor` ours at the largest micro-batch that divides the effective batch and is at most
  ours' own (side "ours-divisor": what 'auto' chose before uneven micro-batches; skipped when ours'
  micro-batch divides it anyway), `--ours-compile` ours with train.compile (each decoder layer
  compiled, expert/train/compiling.py; side "ours-compile", its compile time in its cold pass,
  `initial_seconds` and `plan_seconds`), `--ours-whole-recompute` ours with checkpointing all or
  nothing (side "ours-whole": what 'auto' chose before it could recompute only the first layers),
  `--ours-compile-budget B` ours compiled keeping share B of each layer's activations for the
  backward (train.compile_memory_budget; side "ours-budget", beside "ours-compile").
`--train-fresh` also times each side on batches it has not seen (new widths: attention kernels that
plan per shape pay again), `--ours-pad-multiple N` adds ours with widths rounded up to N (side "ours-padN").
Reported: useful (non-padding) tokens/s, model TFLOP/s at 6N FLOPs per useful token (N = matmul
parameters, as the anchor counts), peak GiB, and the projected time of the original job (500
questions x 10 epochs at the mean length).

Evaluation, MMLU 5-shot shapes (57 subjects: prefix and question lengths) on an 8B-shaped bf16 model:
- ours: `expert.evaluation.scoring.score_questions`: each subject's prefix runs once, then its
  questions' suffixes run packed, several to a row and several rows to a forward, after that
  prefix's KV cache (a block-diagonal mask keeps each question to itself), logits only at the
  scored positions; on a GPU the packs and caches are padded to a few shapes, and the host reads a
  forward's scores only after queuing the next (`--eval-variants` times other ways on the same
  questions);
- peer: lm-evaluation-harness's way: one forward per question over its whole 5-shot context (its
  cache of one-token continuations scores the 4 letters from it), length-sorted batches of 32,
  log_softmax over the full [batch, length, vocabulary] logits.
Reported: questions/s and the projected time of the full 14,042 questions.

GPTQ (`--cases gptq`): the quantize stage's GPTQ call (gptqmodel with our settings) against
gptqmodel's defaults on an 8B-shaped checkpoint cut to a few layers, each side in a fresh process:
wall time, peak GPU memory, peak host RSS, identical saved tensors. Ours runs first and last
(gptqmodel JIT-builds a C++ extension on first use, ~30 s, cached on disk); the last is compared.
Then ours' output goes the 33B preset's way, which the training cases (NF4) never take: loaded as the train stage loads it (gptqmodel's trainable kernel), 6 LoRA steps
with the preset's optimizer, a checkpoint written and resumed, loaded as the evaluation loads it
(its inference kernel: the same loss?), scored with and without prefix caches (the same
predictions?) and with the checkpoint's adapter (the trained loss?), and the same steps on an NF4
base of the same checkpoint: `gptq_vs_nf4_tokens_per_s` says how the preset's GPTQ base trains
against the NF4 figures above. The evaluation loads use the first of `--gptq-eval-kernels`
(eval.gptq_kernel; triton by default, which needs no build); each other one (`auto` by default:
Machete, or Marlin, which gptqmodel builds on first use) is loaded and timed last.

    python3 bench/gpu.py --out DIR --cases eval,llama3-8b,gptq     # a subset
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from common import print_child_result, run_child, work_dir  # bench/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256),
    "llama-33b": dict(hidden_size=6656, intermediate_size=17920, num_hidden_layers=60, num_attention_heads=52,
                      num_key_value_heads=52, vocab_size=32000),
}
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TRAIN_CASES = [
    # name, size, LoRA (r, alpha, targets), peer micro-batch, effective batch
    ("33b-nf4-r8-qv (original job)", "llama-33b", (8, 16, ["q_proj", "v_proj"]), 2, 50),
    ("8b-nf4-r16-all (8B preset)", "llama3-8b", (16, 32, ALL_LINEAR), 8, 48),
]
MEMORY_LIMIT_GIB = 24.0  # the original job's card
SHARED_EXAMPLES = 4  # both sides' loss on these before training: the same objective, or the ratio means nothing
ORIGINAL_JOB_EXAMPLES = 500 * 10
MMLU_QUESTIONS = 14042


def main() -> None:
    args = _parser().parse_args()
    if args.gptq_child:
        print_child_result(_gptq_train_child(args) if args.gptq_child == "train" else _gptq_child(args))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if args.smoke else "cuda")
    lengths = json.loads(Path(args.lengths).read_text())
    result = {"machine": _device_name(device), "versions": _versions(),
              "date": datetime.date.today().isoformat(),
              "command": _command(), "train": [], "eval": None}
    started = time.perf_counter()
    cases = set(args.cases.split(","))
    _train_sides(args)  # a bad --sides or --gptq-sides fails here, before any case has spent GPU time
    _gptq_sides(args)
    if "eval" in cases:
        result["eval"] = _guarded(lambda: _eval_case_rows(args, device, lengths))
        print(json.dumps(result["eval"]), flush=True)
        _write(out, result)
    for name, size, lora, peer_micro, effective in TRAIN_CASES:
        if size not in cases:
            continue
        size = "tiny" if args.smoke else size
        ours_micro = None
        for side in _train_sides(args):
            micro = peer_micro if side == "peer" else ours_micro
            if side == "peer@ours-micro" and (not ours_micro or ours_micro == peer_micro or ours_micro > 16):
                continue  # the peer at our micro-batch: how much of the gain is the micro-batch alone
            if side == "ours-divisor":
                micro = max((m for m in range(1, (ours_micro or 0) + 1) if effective % m == 0), default=None)
                if micro is None or micro == ours_micro:
                    continue
            row = _guarded(lambda: _train_case(args, device, size, lora, micro, effective, lengths, side))
            row.update(case=name, side=side)
            ours_micro = row.get("micro_batch") if side == "ours" else ours_micro
            result["train"].append(row)
            print(json.dumps(row), flush=True)
            _write(out, result)
    if "gptq" in cases:
        result["gptq"] = _guarded(lambda: _gptq_case(args, device, out))
        print(json.dumps(result["gptq"]), flush=True)
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["results"] = _summary(result)
    _write(out, result)
    _print_table(result)


def _train_sides(args) -> list[str]:
    """The training sides to run, in order: what the flags ask for, cut to --sides if given."""
    sides = ["peer", "ours"] + (["ours-plain"] if args.ours_plain else []) \
        + ([f"ours-pad{args.ours_pad_multiple}"] if args.ours_pad_multiple else []) \
        + (["ours-divisor"] if args.ours_divisor else []) + (["ours-compile"] if args.ours_compile else []) \
        + (["ours-whole"] if args.ours_whole_recompute else []) \
        + (["ours-budget"] if args.ours_compile_budget < 1 else []) + ["peer@ours-micro"]
    if not args.sides:
        return sides
    wanted = args.sides.split(",")
    unknown = [side for side in wanted if side not in sides]
    if unknown:  # a typo would otherwise run nothing and still spend the call's model builds
        raise SystemExit(f"--sides: {', '.join(unknown)} not among the sides these flags run: {', '.join(sides)}")
    return [side for side in sides if side in wanted]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu.json")
    p.add_argument("--lengths", default=str(ROOT / "bench/data/pubmedqa_lengths.json"))
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script, measures nothing")
    p.add_argument("--peer-micro-steps", type=int, default=12, help="timed micro-steps of the peer")
    p.add_argument("--peer-random-batches", action="store_true",
                   help="the peer's micro-batches drawn at random (as the runs before 2026-11-27 did), not "
                        "grouped by length as Trainer's train_sampling_strategy='group_by_length' makes them")
    p.add_argument("--ours-examples", type=int, default=100, help="timed examples of ours (whole optimizer steps)")
    p.add_argument("--eval-pack-sweep", default="",
                   help="comma-separated pack sizes (suffix tokens per forward) timed on three subjects")
    p.add_argument("--eval-variants", default="",
                   help="comma-separated scoring variants also timed on the same questions: exact (packs "
                        "and caches unpadded), fixed (padded to few shapes, the default on a GPU), "
                        "efficient (exact, SDPA kept off cuDNN), fixed-efficient, one-row (fixed, one row "
                        "per pack: attention over the whole pack), read-each (fixed, each forward's "
                        "scores read as soon as it is queued)")
    p.add_argument("--eval-profile", action="store_true",
                   help="profile the scoring of one subject: top kernels and how busy the GPU is")
    p.add_argument("--train-profile", action="store_true",
                   help="profile one optimizer step of ours: top kernels and how busy the GPU is")
    p.add_argument("--train-fresh", action="store_true",
                   help="also time each side on batches it has not seen: a run's steady state meets new "
                        "batch widths, and attention kernels that plan per shape pay for each")
    p.add_argument("--ours-pad-multiple", type=int, default=0,
                   help="also run ours with batch widths rounded up to this multiple (side ours-padN): fewer shapes")
    p.add_argument("--ours-whole-recompute", action="store_true",
                   help="also run ours with checkpointing all or nothing, as 'auto' chose before it could "
                        "recompute only some layers (side ours-whole)")
    p.add_argument("--ours-compile-budget", type=float, default=1.0,
                   help="also run ours compiled with train.compile_memory_budget set to this share (0-1): the "
                        "compiler recomputes the rest of a layer's activations in the backward (side ours-budget)")
    p.add_argument("--ours-divisor", action="store_true",
                   help="also run ours at the largest micro-batch dividing the effective batch (side ours-divisor)")
    p.add_argument("--sides", default="",
                   help="run only these training sides (comma-separated, e.g. ours,ours-compile: a shorter call); "
                        "default: every side the other flags ask for")
    p.add_argument("--ours-compile", action="store_true",
                   help="also run ours with train.compile: each decoder layer compiled (side ours-compile)")
    p.add_argument("--ours-plain", action="store_true",
                   help="also run ours without lean activations (expert.train.lean): what they add")
    p.add_argument("--eval-subject-stride", type=int, default=6, help="ours scores every N-th MMLU subject")
    p.add_argument("--eval-peer-questions", type=int, default=128)
    p.add_argument("--cases", default="llama-33b,llama3-8b,eval,gptq",
                   help="comma-separated: the training cases by size (llama-33b, llama3-8b), eval, gptq")
    p.add_argument("--gptq-layers", type=int, default=4, help="decoder layers of the 8B-shaped GPTQ model")
    p.add_argument("--gptq-timeout", type=int, default=240, help="seconds each GPTQ side may take")
    p.add_argument("--gptq-site", help="folder with gptqmodel and its helpers, on the path of the GPTQ processes "
                                       "only (beside peft, an importable gptqmodel makes peft demand optimum)")
    p.add_argument("--gptq-dtype", default="float16", choices=("float16", "bfloat16"),
                   help="dtype of the checkpoint quantized and trained on: float16 as configs/gpu-33b.yaml's "
                        "LLaMA (trained under bf16 autocast, as the pipeline does), bfloat16 as gpu-8b.yaml's")
    p.add_argument("--gptq-sides", default="",
                   help="run only these GPTQ sides (comma-separated among ours-gpupack, ours-cold, peer, ours, "
                        "ours-checkpoint); "
                        "`ours` alone quantizes once and goes on to the training check: a short call")
    p.add_argument("--gptq-train-compile", action="store_true",
                   help="the GPTQ training check also with train.compile (row gptq_compiled: gptqmodel's "
                        "trainable kernel inside compiled decoder layers; its compiling in first_step_seconds)")
    p.add_argument("--gptq-gpu-pack", action="store_true",
                   help="also run ours with gptqmodel's CUDA packing (pack_impl='gpu', side ours-gpupack), first, "
                        "before any side has built gptqmodel's CPU packing extension")
    p.add_argument("--gptq-checkpoint", action="store_true",
                   help="also run ours with the quantize stage's layer checkpoints (side ours-checkpoint, last): "
                        "their time against ours, their disk use, and the same tensors")
    p.add_argument("--gptq-eval-kernels", default="triton,auto",
                   help="eval.gptq_kernel values the GPTQ training check loads its model with for inference, "
                        "comma-separated: the first for the evaluation checks, each other one timed at the end "
                        "(load, which may build the kernel, and scoring). Default: triton (no build), then auto "
                        "(Machete, or Marlin without the CUTLASS sources)")
    p.add_argument("--gptq-child", choices=("ours", "peer", "train"), help=argparse.SUPPRESS)
    p.add_argument("--gptq-work", help=argparse.SUPPRESS)
    p.add_argument("--gptq-base", help=argparse.SUPPRESS)
    p.add_argument("--gptq-pack-impl", help=argparse.SUPPRESS)
    p.add_argument("--gptq-model", help=argparse.SUPPRESS)
    return p


def _guarded(fn) -> dict:
    """One case failing (an OOM, a missing package) must not lose the others."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - reported in the JSON, then the next case runs
        return {"error": repr(exc)[:500]}
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ---------------------------------------------------------------- models

def build(size: str, quant: str, device: torch.device, layers: int | None = None):
    """Random-weight Llama built layer by layer on the device, linear layers NF4 when quant == 'nf4'."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = {**SIZES[size], **({"num_hidden_layers": layers} if layers else {})}
    cfg = LlamaConfig(**shape, max_position_embeddings=4096, attn_implementation="sdpa")
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to(torch.bfloat16)
    gen = torch.Generator(device=device).manual_seed(0)

    def materialize(module):
        module.to_empty(device=device, recurse=True)
        with torch.no_grad():
            for name, p in module.named_parameters(recurse=True):
                p.fill_(1.0) if "norm" in name else p.normal_(0.0, 0.02, generator=gen)

    for module in (model.model.embed_tokens, model.model.norm, model.lm_head):
        materialize(module)
    model.model.rotary_emb = type(model.model.rotary_emb)(cfg).to(device)
    for layer in model.model.layers:
        materialize(layer)
        if quant == "nf4":
            _to_nf4(layer, device)
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model, cfg


def _to_nf4(layer, device) -> None:
    import bitsandbytes as bnb

    for parent in (layer.self_attn, layer.mlp):
        for name, lin in list(parent.named_children()):
            if isinstance(lin, nn.Linear):
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.bfloat16,
                                      quant_type="nf4", device="meta")
                q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
                setattr(parent, name, q.to(device))


def matmul_params(cfg) -> int:
    h, i, layers, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    return layers * (2 * h * h + 2 * h * kv + 3 * h * i) + h * v


# ---------------------------------------------------------------- training

def _examples(lengths: dict, vocab: int, smoke: bool):
    """Random-token examples with PubMedQA's lengths; the answer + EOS tokens carry the labels."""
    from expert.train.data import IGNORE, Example

    rng = random.Random(0)
    out = []
    for total, answer in zip(lengths["pubmedqa_train"], lengths["pubmedqa_answer"]):
        total = max(answer + 4, total // 8) if smoke else total
        ids = [rng.randrange(3, vocab) for _ in range(total)]
        out.append(Example(ids, [IGNORE] * (total - answer) + ids[total - answer:]))
    return out


def _train_case(args, device, size, lora, peer_micro, effective, lengths, side) -> dict:
    quant = "none" if args.smoke else "nf4"
    model, cfg = build(size, quant, device)
    examples = _examples(lengths, cfg.vocab_size, args.smoke)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if side.startswith("ours"):
        row = _ours_train(args, model, examples, lora, effective, device, lean=side != "ours-plain",
                          pad_multiple=args.ours_pad_multiple if side.startswith("ours-pad") else 1,
                          micro=peer_micro if side == "ours-divisor" else "auto",
                          compile=side in ("ours-compile", "ours-budget"), whole_recompute=side == "ours-whole",
                          memory_budget=args.ours_compile_budget if side == "ours-budget" else 1.0)
    else:
        row = _peer_train(args, model, examples, lora, peer_micro, effective, device)
    flops = 6 * matmul_params(cfg)
    mean_len = statistics.mean(len(e.input_ids) for e in examples)
    row.update(model_tflops=round(flops * row["tokens_per_s"] / 1e12, 1),
               original_job_min=round(ORIGINAL_JOB_EXAMPLES * mean_len / row["tokens_per_s"] / 60, 1),
               mean_example_tokens=round(mean_len, 1))
    if device.type == "cuda":
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del model
    return row


def _peer_train(args, model, examples, lora, micro, effective, device) -> dict:
    """Trainer + PEFT's inner loop: shuffled examples, padded batches, the model's own loss."""
    from peft import LoraConfig, get_peft_model

    r, alpha, targets = lora
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.05, target_modules=targets,
                                             bias="none", task_type="CAUSAL_LM"))
    model.train()
    with torch.no_grad(), _autocast(device):  # LoRA's B starts at zero: the base model's loss, as ours'
        ids, mask, labels = _padded(examples[:SHARED_EXAMPLES])
        initial = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    rng = random.Random(1)
    count = 2 if args.smoke else args.peer_micro_steps
    if args.peer_random_batches:  # the committed runs before 2026-11-27 (padding 17-27%)
        batches = [[examples[rng.randrange(len(examples))] for _ in range(micro)] for _ in range(count)]
        fresh = [[examples[rng.randrange(len(examples))] for _ in range(micro)] for _ in batches]
    else:  # timed over the widths of an epoch, as ours' batches are (both report timed_mean_tokens)
        lengths = [len(e.input_ids) for e in examples]
        seen, unseen = _two_sets(_spread(_length_grouped(lengths, micro, effective, rng), lengths, 2 * count))
        batches, fresh = ([[examples[i] for i in b] for b in half] for half in (seen, unseen))

    def window(batches) -> tuple[int, int, float]:
        useful = padded = 0
        _sync(device)
        start = time.perf_counter()
        for batch in batches:
            ids, mask, labels = _padded(batch)
            with _autocast(device):
                loss = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
            loss.backward()
            useful += int(mask.sum())
            padded += mask.numel()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        return useful, padded, time.perf_counter() - start

    # New batch widths cost the masked attention path a first-time setup; a long run meets each width
    # many times, so the number kept is the second pass over the same batches (the peer's best case).
    _, _, cold = window(batches)
    useful, padded, seconds = window(batches)
    extra = {}
    if args.train_fresh:
        new_useful, _, new_seconds = window(fresh)
        extra["fresh_tokens_per_s"] = round(new_useful / new_seconds, 1)
        extra["fresh_mean_tokens"] = round(statistics.mean(len(e.input_ids) for b in fresh for e in b), 1)
    extra["batches"] = "random" if args.peer_random_batches else "grouped by length (Trainer's group_by_length)"
    return {**extra, "micro_batch": micro, "gradient_checkpointing": True, "tokens_per_s": round(useful / seconds, 1),
            "initial_loss": round(float(initial), 4), "timed_examples": sum(len(b) for b in batches),
            "timed_mean_tokens": round(statistics.mean(len(e.input_ids) for b in batches for e in b), 1),
            "cold_tokens_per_s": round(useful / cold, 1),
            "padding_fraction": round(1 - useful / padded, 3), "seconds": round(seconds, 2)}


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def _spread(batches: list[list[int]], lengths: list[int], count: int) -> list[list[int]]:
    """`count` of `batches`, evenly spaced over them sorted by width (the longest example)."""
    ordered = sorted(batches, key=lambda b: max(lengths[i] for i in b))
    return [ordered[(2 * k + 1) * len(ordered) // (2 * count)] for k in range(count)]


def _two_sets(ordered: list) -> tuple[list, list]:
    """Split items sorted by width into two sets with the same spread, taking pairs A-B-B-A:
    plain alternation gave the first set the shorter item of every pair (H100 8B run of
    2026-11-27: its timed examples averaged 275.7 tokens against the data's 337)."""
    return ([x for k, x in enumerate(ordered) if k % 4 in (0, 3)],
            [x for k, x in enumerate(ordered) if k % 4 in (1, 2)])


def _length_grouped(lengths: list[int], micro: int, effective: int, rng: random.Random) -> list[list[int]]:
    """An epoch's micro-batches (example indices) as Trainer's `train_sampling_strategy=
    "group_by_length"` makes them (transformers' LengthGroupedSampler): a shuffled order cut into
    megabatches of 50 optimizer steps' examples, each sorted by length, longest first, then cut
    into micro-batches in that order."""
    order = rng.sample(range(len(lengths)), len(lengths))
    mega = 50 * effective
    grouped = [i for start in range(0, len(order), mega)
               for i in sorted(order[start:start + mega], key=lambda i: -lengths[i])]
    return [grouped[i:i + micro] for i in range(0, len(grouped) - micro + 1, micro)]


def _padded(batch):
    """DataCollatorForSeq2Seq: right padding to the batch's longest, labels padded with -100."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n], mask[row, :n], labels[row, :n] = torch.tensor(e.input_ids), 1, torch.tensor(e.labels)
    return ids, mask, labels


def _ours_train(args, model, examples, lora, effective, device, lean: bool = True,
                pad_multiple: int = 1, micro: int | str = "auto", compile: bool = False,
                whole_recompute: bool = False, memory_budget: float = 1.0) -> dict:
    """expert.train's pieces: LoRA, memory plan, length-bucketed batches, Runner.step (lean=False:
    without the lean activations, to see what they add; pad_multiple > 1: batch widths rounded up
    to it, to see what fewer shapes buy; micro: a micro-batch size instead of 'auto'; compile:
    train.compile, whose compiling falls in the first forwards: `initial_seconds`, `plan_seconds`;
    whole_recompute: the plan recomputes every layer or none, as before it could do some;
    memory_budget: train.compile_memory_budget, with compile)."""
    import contextlib
    from unittest import mock

    from expert.train import memory as memory_module  # its `fewest`, patched for side ours-whole
    from expert.train import step as step_module
    from expert.train import TrainConfig
    from expert.train.data import IGNORE, BatchPlan, EncodedSplit, step_sizes
    from expert.train.lora import attach_lora, make_optimizer, make_scheduler
    from expert.train.memory import plan_memory
    from expert.train.step import Runner

    r, alpha, targets = lora
    config = TrainConfig(lora_r=r, lora_alpha=alpha, target_modules=targets, micro_batch_size=micro,
                         effective_batch_size=effective, gradient_checkpointing="auto",
                         memory_limit_gib=MEMORY_LIMIT_GIB, max_length=512, warmup_steps=0,
                         lean_activations=lean, compile=compile, compile_memory_budget=memory_budget)
    torch.manual_seed(0)
    model = attach_lora(model, config)
    model.train()
    started = time.perf_counter()
    with torch.no_grad(), _autocast(device):  # LoRA's B starts at zero: the base model's loss, as the peer's
        shared = step_module.collate(examples[:SHARED_EXAMPLES], 0)
        labelled = int((shared["labels"] != IGNORE).sum())
        initial = float(step_module.answer_loss_sum(model, shared, device) / labelled)
    initial_seconds = time.perf_counter() - started
    lengths = [len(e.input_ids) for e in examples]
    planned = time.perf_counter()
    whole = mock.patch.object(memory_module, "fewest", _all_or_none)
    with whole if whole_recompute else contextlib.nullcontext():
        memory = plan_memory(model, config, max(lengths), device, typical=int(statistics.median(lengths)),
                             answer_tokens=max(e.answer_tokens for e in examples))
    plan_seconds = time.perf_counter() - planned
    plan = BatchPlan(lengths, step_sizes(effective, memory.micro_batch_size), epochs=10, seed=0)
    accum = plan.accum
    optimizer = make_optimizer(config, model)
    runner = Runner(model, optimizer, make_scheduler(config, optimizer, plan.total_steps),
                    EncodedSplit(examples, 0, []), pad_id=0, max_grad_norm=1.0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # Windows of whole micro-batches of the run's own (length-bucketed) batches; each ends with an
    # optimizer step. Few big micro-batches taken in run order could be all short or all long ones,
    # so they are taken evenly over the widths of an epoch: the timed examples have the data's
    # length mix, as the peer's random draws do (both report `timed_mean_tokens`).
    # At least 4 micro-batches a set: with 2 of 48 examples (the 8B preset) one set's mean length
    # came out 20% off the data's whichever 2 were taken.
    per_window = max(1, min(accum, -(-args.ours_examples // memory.micro_batch_size)))
    count = max(2, -(-4 // per_window))  # windows per set
    stream = _spread([plan._batch(i) for i in range(max(plan.per_epoch, 2 * count * per_window))], lengths,
                     2 * count * per_window)
    seen, unseen = _two_sets(stream)
    windows = [seen[k * per_window:(k + 1) * per_window] for k in range(count)]
    fresh = [unseen[k * per_window:(k + 1) * per_window] for k in range(count)]
    padded = sum(_round_up(max(lengths[i] for i in b), pad_multiple) * len(b) for b in seen)
    real_collate = step_module.collate

    def collate(examples, pad_id):  # right padding to a multiple: more pad positions, no labels on them
        batch = real_collate(examples, pad_id)
        extra_width = _round_up(batch["input_ids"].shape[1], pad_multiple) - batch["input_ids"].shape[1]
        pad = {"input_ids": pad_id, "labels": IGNORE}
        return {k: torch.nn.functional.pad(v, (0, extra_width), value=pad[k]) for k, v in batch.items()}

    def timed(runs) -> tuple[float, float]:
        tokens = seconds = 0.0
        for batches in runs:
            _, n, s, _, _ = runner.step(batches)
            tokens, seconds = tokens + n, seconds + s
        return tokens, seconds

    extra = {}
    with mock.patch.object(step_module, "collate", collate) if pad_multiple > 1 else contextlib.nullcontext():
        passes = []
        for _ in range(2):  # cold, then warm: the same measurement as the peer's
            tokens, seconds = timed(windows)
            passes.append(seconds)
        if args.train_fresh:
            new_tokens, new_seconds = timed(fresh)
            extra["fresh_tokens_per_s"] = round(new_tokens / new_seconds, 1)
            extra["fresh_mean_tokens"] = round(statistics.mean(lengths[i] for b in unseen for i in b), 1)
        if args.train_profile and lean and pad_multiple == 1 and not compile and not whole_recompute:
            # The first window of the seen set: its narrower half (run 2026-11-27a: 262.5 tokens an
            # example against the timed 333.5), so the profile says which tokens it covered.
            extra["profile"] = {**_profile(lambda: runner.step(windows[0]), device),
                                "useful_tokens": sum(lengths[i] for b in windows[0] for i in b),
                                "micro_batches": len(windows[0])}
    return {**extra, "micro_batch": memory.micro_batch_size, "step_micro_batches": plan.sizes,
            "gradient_checkpointing": memory.gradient_checkpointing, "recomputed_layers": memory.recomputed_layers,
            "memory_plan": memory.as_dict(), "plan_seconds": round(plan_seconds, 1),
            "initial_seconds": round(initial_seconds, 1), "initial_loss": round(initial, 4),
            "compile_memory_budget": memory_budget, "timed_examples": sum(len(b) for b in seen),
            "timed_mean_tokens": round(statistics.mean(lengths[i] for b in seen for i in b), 1),
            "tokens_per_s": round(tokens / passes[1], 1), "cold_tokens_per_s": round(tokens / passes[0], 1),
            "padding_fraction": round(1 - tokens / padded, 3), "seconds": round(passes[1], 2)}


def _all_or_none(every: int, ok, guess=None) -> int:
    """`memory.fewest` as the planner had it before partial recompute: no layer if that fits, else all."""
    return 0 if ok(0) else every


# ---------------------------------------------------------------- evaluation

def _eval_case_rows(args, device, lengths) -> dict:
    """The eval case; in a smoke run with rows of 64 tokens, so that the tiny model's packs (256
    tokens) have several rows, as an 8B model's have."""
    from unittest import mock

    from expert.evaluation import scoring

    with mock.patch.object(scoring, "ROW_TOKENS", 64) if args.smoke else contextlib.nullcontext():
        return _eval_case(args, device, lengths)


def _eval_case(args, device, lengths) -> dict:
    from expert.evaluation.scoring import Question, score_questions

    model, cfg = build("tiny" if args.smoke else "llama3-8b", "none", device)
    model = _Work(_CacheKwarg.wrap(model.eval()))
    rng = random.Random(2)
    subjects = sorted(lengths["mmlu"])[::args.eval_subject_stride]
    scale = 8 if args.smoke else 1
    questions, groups, letters = [], [], [rng.randrange(3, cfg.vocab_size) for _ in range(4)]
    for subject in subjects:
        entry = lengths["mmlu"][subject]
        prefix = [rng.randrange(3, cfg.vocab_size) for _ in range(entry["prefix"] // scale)]
        group = []
        for n in entry["questions"][:40 if args.smoke else None]:
            group.append(len(questions))
            suffix = [rng.randrange(3, cfg.vocab_size) for _ in range(max(2, n // scale))]
            questions.append(Question(prefix + suffix, [[t] for t in letters]))
        groups.append(group)
    max_length = 4096
    # First pass warms kernels and the allocator for the pack shapes; the second is timed.
    score_questions(model, questions[:len(groups[0])], max_length=max_length, batch_size=32, groups=groups[:1])
    _sync(device)
    model.reset()
    if device.type == "cuda":  # ours' own peak: what a card needs beyond the weights to score this way
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    ours = score_questions(model, questions, max_length=max_length, batch_size=32, groups=groups)
    _sync(device)
    ours_s = time.perf_counter() - start
    ours_peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None
    work = model.summary(cfg, ours_s)
    from expert.evaluation import scoring
    from expert.evaluation.packing import row_shape
    from expert.evaluation.scoring import pack_tokens

    prefix_tokens = sum(lengths["mmlu"][subject]["prefix"] // scale * len(g) for subject, g in zip(subjects, groups))
    suffix_tokens = sum(len(q.context) for q in questions) - prefix_tokens
    sample = sorted(rng.sample(range(len(questions)), min(args.eval_peer_questions, len(questions))))
    _peer_score(model, [questions[i] for i in sample[:32]], device)  # warm-up
    _sync(device)
    start = time.perf_counter()
    peer = _peer_score(model, [questions[i] for i in sample], device)
    _sync(device)
    peer_s = time.perf_counter() - start
    agree = sum(_argmax(ours[i]) == _argmax(p) for i, p in zip(sample, peer))
    diff = max(abs(a - b) for i, p in zip(sample, peer) for a, b in zip(ours[i], p))
    ours_qps, peer_qps = len(questions) / ours_s, len(sample) / peer_s
    pack = pack_tokens(model)
    height, width = row_shape(pack, scoring.ROW_TOKENS)
    first = questions[:len(groups[0])]
    extra = {}
    if args.eval_variants:
        extra["variants"] = _variants(model, questions, groups, device, args.eval_variants)
    if args.eval_pack_sweep:
        extra["pack_sweep"] = _pack_sweep(model, questions, groups, device, args.eval_pack_sweep)
    if args.eval_profile:
        extra["profile"] = _profile(lambda: score_questions(model, first, max_length=max_length, groups=groups[:1]),
                                    device)
    del model
    return {"model": "8B-shaped (Llama-3) bf16, random weights" if not args.smoke else "tiny",
            "subjects": len(subjects), "ours_questions": len(questions), "peer_questions": len(sample),
            "ours_questions_per_s": round(ours_qps, 1), "peer_questions_per_s": round(peer_qps, 1),
            "ratio": round(ours_qps / peer_qps, 2),
            "ours_path": f"packed suffixes after each subject's prefix cache, {pack} tokens per pack in "
                         f"{height} row{'s' * (height > 1)} of {width}",
            "ours_suffix_tokens": suffix_tokens,
            "ours_suffix_tokens_per_s": round(suffix_tokens / ours_s),
            "ours_full_mmlu_s": round(MMLU_QUESTIONS / ours_qps, 1),
            "peer_full_mmlu_s": round(MMLU_QUESTIONS / peer_qps, 1),
            "ours_work": work,
            "same_prediction": f"{agree}/{len(sample)}", "max_loglik_diff": round(diff, 4),
            "ours_peak_gib": ours_peak,
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
            **extra}


def _variants(model, questions, groups, device, names: str) -> list[dict]:
    """Questions/s of other ways to run the same packs: with the shapes unpadded (every pack a new
    attention shape) or padded to a few (`fixed_shapes`), with SDPA kept off cuDNN, whose
    kernels plan once per shape, with one row per pack (the layout before 2026-11-28: attention
    over the whole pack), and with each forward's scores read as soon as it is queued."""
    from unittest import mock

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from expert.evaluation import scoring

    off_cudnn = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    settings = {"exact": (False, None, {}), "fixed": (True, None, {}), "efficient": (False, off_cudnn, {}),
                "fixed-efficient": (True, off_cudnn, {}), "one-row": (True, None, {"ROW_TOKENS": 10**9}),
                "read-each": (True, None, {"IN_FLIGHT": 0})}
    rows = []
    for name in names.split(","):
        fixed, backends, patches = settings[name]
        with contextlib.ExitStack() as stack:
            if backends:
                stack.enter_context(sdpa_kernel(backends))
            for attribute, value in patches.items():
                stack.enter_context(mock.patch.object(scoring, attribute, value))
            scoring.score_questions(model, questions[:len(groups[0])], max_length=4096, groups=groups[:1],
                                    fixed_shapes=fixed)
            _sync(device)
            model.reset()
            start = time.perf_counter()
            scoring.score_questions(model, questions, max_length=4096, groups=groups, fixed_shapes=fixed)
            _sync(device)
            seconds = time.perf_counter() - start
        qps = len(questions) / seconds
        rows.append({"variant": name, "questions_per_s": round(qps, 1), "full_mmlu_s": round(MMLU_QUESTIONS / qps, 1),
                     "work": model.summary(model.config, seconds)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _pack_sweep(model, questions, groups, device, sizes: str) -> list[dict]:
    """Questions/s of the first three subjects with other pack sizes (suffix tokens per forward)."""
    from unittest import mock

    from expert.evaluation import scoring

    some = [i for g in groups[:3] for i in g]
    picked = [questions[i] for i in some]
    where = {q: n for n, q in enumerate(some)}
    regrouped = [[where[i] for i in g] for g in groups[:3]]
    rows = []
    for size in (int(x) for x in sizes.split(",")):
        with mock.patch.object(scoring, "pack_tokens", lambda model, size=size: size):
            scoring.score_questions(model, picked[:len(regrouped[0])], max_length=4096, groups=regrouped[:1])
            _sync(device)
            start = time.perf_counter()
            scoring.score_questions(model, picked, max_length=4096, groups=regrouped)
            _sync(device)
        rows.append({"pack_tokens": size, "questions_per_s": round(len(picked) / (time.perf_counter() - start), 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _profile(run, device, top: int = 15) -> dict:
    """Where one call's time goes: the kernels (or CPU ops) with the most self time, how busy the
    GPU was, and what the host did meanwhile.

    `busy_fraction` is the GPU's kernel time over the wall time of the same call run unprofiled
    (the warm-up run, timed): the profiler slows the host, so its own wall time (`profiled_wall_s`)
    would make any step look host-bound. `host` lists the CPU-side events with the most self time
    and the CUDA runtime calls (launches, synchronizations, copies, allocations): many
    synchronizations with little time in them and a low busy fraction mean the GPU waits on the
    host; long synchronizations mean the host waits on the GPU."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    start = time.perf_counter()
    run()  # warm, and timed: the wall time the busy fraction is measured against
    _sync(device)
    wall = time.perf_counter() - start
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        run()
        _sync(device)
    profiled_wall = time.perf_counter() - start
    averages = prof.key_averages()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in averages if getattr(e, key, 0) > 0]
    if device.type == "cuda":  # an aten op carries its kernels' device time too: count the kernels only
        events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation]
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) / 1e6
    rows = [{"name": e.key[:90], "ms": round(getattr(e, key) / 1e3, 1), "calls": e.count,
             "share": round(getattr(e, key) / 1e6 / total, 3)} for e in events[:top]]
    host = _host_events(averages)
    print(json.dumps({"wall_s": round(wall, 2), "profiled_wall_s": round(profiled_wall, 2),
                      "busy_s": round(total, 2)}), flush=True)
    for row in rows:
        print(json.dumps(row), flush=True)
    print(json.dumps({"host": host}), flush=True)
    return {"wall_s": round(wall, 2), "profiled_wall_s": round(profiled_wall, 2), "busy_s": round(total, 2),
            "busy_fraction": round(total / wall, 3), "top": rows, "host": host}


def _host_events(averages, top: int = 10) -> dict:
    """The host's side of a profile: CPU ops by self time, and the CUDA runtime calls apart (their
    names start with `cuda` or `cu`: launches, synchronizations, copies, allocations)."""
    cpu = [e for e in averages if e.device_type == torch.autograd.DeviceType.CPU and e.self_cpu_time_total > 0
           and not e.is_user_annotation]
    runtime = [e for e in cpu if e.key.startswith("cu")]
    ops = [e for e in cpu if not e.key.startswith("cu")]

    def rows(events):
        events = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
        return [{"name": e.key[:90], "ms": round(e.self_cpu_time_total / 1e3, 1), "calls": e.count} for e in events]

    return {"ops_self_s": round(sum(e.self_cpu_time_total for e in ops) / 1e6, 2),
            "runtime_self_s": round(sum(e.self_cpu_time_total for e in runtime) / 1e6, 2),
            "ops": rows(ops), "runtime": rows(runtime)}


@torch.inference_mode()
def _peer_score(model, questions, device, batch_size: int = 32) -> list[list[float]]:
    """lm-eval's loglikelihood path for one-token continuations: one forward per context."""
    order = sorted(range(len(questions)), key=lambda i: -len(questions[i].context))
    scores: list[list[float]] = [[] for _ in questions]
    vocab = model.config.vocab_size
    start = 0
    while start < len(order):
        # lm-eval's batch_size "auto" idea: as many rows as the [rows, width, vocab] float32 logits
        # and their log_softmax allow in ~16 GiB (MMLU's longest 5-shot contexts exceed 2,000 tokens).
        width = len(questions[order[start]].context)
        rows = max(1, min(batch_size, int(16 * 2**30 // (2 * 4 * width * vocab))))
        idx = order[start:start + rows]
        start += rows
        ids = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, :len(questions[i].context)] = torch.tensor(questions[i].context)
        logprobs = torch.log_softmax(model(input_ids=ids.to(device)).logits.float(), dim=-1)
        for row, i in enumerate(idx):
            last = logprobs[row, len(questions[i].context) - 1]
            scores[i] = [float(last[c[0]]) for c in questions[i].choices]
    return scores


# ---------------------------------------------------------------- GPTQ

def _gptq_case(args, device, out: Path) -> dict:
    """The quantize stage's GPTQ (gptqmodel with our settings) vs gptqmodel's own defaults.

    An 8B-shaped Llama cut to --gptq-layers decoder layers (GPTQ works one layer at a time, so
    time and memory per layer carry over to 32 layers), random weights saved as a checkpoint in
    --gptq-dtype (float16 by default, as the 33B preset's LLaMA), 128 calibration samples of
    random tokens with PubMedQA's lengths (cut to 512).
    Each side quantizes in a fresh process: wall time (load + GPTQ + save), peak GPU memory,
    peak host RSS, and whether the saved tensors are bit-identical.
    """
    with work_dir("gptq-") as work:  # removed when the case ends, a failed side or an error included
        return _gptq_case_in(args, device, out, work)


def _gptq_case_in(args, device, out: Path, work: Path) -> dict:
    from expert.artifacts import folder_bytes

    model_dir = work / "base"
    layers = 2 if args.smoke else args.gptq_layers
    _save_gptq_base(model_dir, "tiny" if args.smoke else "llama3-8b", layers, device, getattr(torch, args.gptq_dtype))
    sides = {}
    # Ours runs first and again last: a first process pays one-off costs (kernel compilation
    # caches on disk) that a second does not; the warm run is compared with the peer. Ours with
    # CUDA packing goes before them all: whether it spares a machine's first run that build.
    env = dict(os.environ)
    env.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # gptqmodel fails on fewer CPU workers (see bench/quantize.py)
    env["TERM"] = "dumb"  # no progress bars redrawn into the logs on either side (ours draws none there anyway)
    if args.gptq_site:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.gptq_site, env.get("PYTHONPATH")]))
    for side in _gptq_sides(args):
        cmd = [sys.executable, __file__, "--out", str(work / side), "--gptq-child", side.split("-")[0],
               "--gptq-model", str(model_dir), "--lengths", args.lengths] + (["--smoke"] if args.smoke else []) \
            + (["--gptq-pack-impl", "gpu"] if side == "ours-gpupack" else []) \
            + (["--gptq-work", str(work / "checkpoints")] if side == "ours-checkpoint" else [])
        sides[side] = _gptq_process(cmd, side, out, args.gptq_timeout, env)
    row = {"model": f"8B-shaped (Llama-3) cut to {layers} layers, random {args.gptq_dtype} weights" if not args.smoke
           else "tiny", "layers": layers, "base_dtype": args.gptq_dtype, **{side: sides[side] for side in sides}}
    if all("seconds" in sides.get(s, {}) for s in ("ours", "peer")):
        row["identical_tensors"] = _identical_tensors(work / "ours", work / "peer")
        # Only when the cold run finished: it pays gptqmodel's one-off extension build, which
        # otherwise falls into the peer's timed run.
        if "seconds" in sides.get("ours-cold", {}):
            row["ratio"] = round(sides["peer"]["seconds"] / sides["ours"]["seconds"], 2)
        else:
            row["ratio"] = None
            cold = "did not finish" if "ours-cold" in sides else "was not run (--gptq-sides)"
            row["ratio_note"] = f"ours-cold {cold}: the peer may have paid gptqmodel's extension build"
    if all("seconds" in sides.get(s, {}) for s in ("ours-gpupack", "peer")):
        row["gpupack_identical_tensors"] = _identical_tensors(work / "ours-gpupack", work / "peer")
        row["gpupack_ratio"] = round(sides["peer"]["seconds"] / sides["ours-gpupack"]["seconds"], 2)
    if all("seconds" in sides.get(s, {}) for s in ("ours-checkpoint", "ours")):
        # the stage's layer checkpoints (expert/quantize/checkpoint.py): their cost in time and disk
        row["checkpoint_identical_tensors"] = _identical_tensors(work / "ours-checkpoint", work / "ours")
        row["checkpoint_time_ratio"] = round(sides["ours-checkpoint"]["seconds"] / sides["ours"]["seconds"], 3)
        row["checkpoint_disk_mib"] = round(folder_bytes(work / "checkpoints") / 2**20, 1)
    if "seconds" in sides.get("ours", {}):
        row["train"] = _gptq_train(args, work, model_dir, out, env)
    return row


GPTQ_SIDES = ("ours-gpupack", "ours-cold", "peer", "ours", "ours-checkpoint")


def _gptq_sides(args) -> list[str]:
    """The GPTQ sides to run, in order: ours-cold, peer, ours (ours-gpupack first with
    --gptq-gpu-pack, ours-checkpoint last with --gptq-checkpoint), cut to --gptq-sides if given."""
    sides = ["ours-gpupack"] * args.gptq_gpu_pack + ["ours-cold", "peer", "ours"] \
        + ["ours-checkpoint"] * args.gptq_checkpoint
    if not args.gptq_sides:
        return sides
    wanted = args.gptq_sides.split(",")
    unknown = [side for side in wanted if side not in GPTQ_SIDES]
    if unknown:
        raise SystemExit(f"--gptq-sides: {', '.join(unknown)} unknown; the sides are {', '.join(GPTQ_SIDES)}")
    return [side for side in GPTQ_SIDES if side in wanted]


def _gptq_train(args, work: Path, model_dir: Path, out: Path, env: dict) -> dict:
    """Ours' GPTQ output trained and scored as the pipeline would (`_gptq_train_child`)."""
    cmd = [sys.executable, __file__, "--out", str(work / "train"), "--gptq-child", "train", "--gptq-model",
           str(work / "ours"), "--gptq-base", str(model_dir), "--lengths", args.lengths] \
        + ["--gptq-eval-kernels", args.gptq_eval_kernels] \
        + (["--smoke"] if args.smoke else []) + (["--gptq-train-compile"] if args.gptq_train_compile else [])
    return _gptq_process(cmd, "train", out, args.gptq_timeout, env)


_STARTED = time.perf_counter()


def _phase(message: str) -> None:
    """A line in a child's log, with the seconds since it started: where it was if it was killed."""
    print(f"[{time.perf_counter() - _STARTED:7.1f} s] {message}", flush=True)


def _gptq_process(cmd: list[str], name: str, out: Path, timeout: int, env: dict) -> dict:
    """One GPTQ child process: its result, or {"error"} when it failed or ran out of time (one side
    failing must not lose the others' numbers). All it prints goes to out/gptq_NAME.log as it is
    printed: a call the device machine ends mid-child still brings back where it was (an H100
    call ended inside the training check's inference load once, and nothing of it came back)."""
    import subprocess

    log = out / f"gptq_{name}.log"
    try:
        return run_child(cmd, f"gptq {name}", log=log, timeout=timeout, env=env)[0]
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish in {timeout} s (its log: {log.name})"}
    except SystemExit as failed:
        return {"error": str(failed)[-600:]}


def _save_gptq_base(folder: Path, size: str, layers: int, device, dtype: torch.dtype) -> None:
    """A random-weight checkpoint in `dtype` with a word-level tokenizer over the model's vocabulary
    (gptqmodel wants a tokenizer; its calibration here is token ids already)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    model, cfg = build(size, "none", device, layers=layers)
    model = model.to(dtype)
    model.config.use_cache = True
    model.save_pretrained(folder, safe_serialization=True)
    vocab = {f"t{i}": i for i in range(cfg.vocab_size)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                  unk_token="t0", pad_token="t0", eos_token="t1", bos_token="t2")
    tok.save_pretrained(folder)
    del model


def _pcre_shim() -> bool:
    """Whether gptqmodel's `pcre` is the shim here: pypcre (a PCRE2 binding gptqmodel uses to
    match module names) has no wheel for the GPU image's Python and builds only with cmake, and
    a shim over `re` serves those patterns."""
    try:
        import pcre  # noqa: F401
        return False
    except ImportError:
        sys.path.insert(0, str(ROOT / "bench" / "gpu_pcre"))
        return True


def _gptq_child(args) -> dict:
    shim = _pcre_shim()
    import gptqmodel  # noqa: F401 - imports are not timed
    from transformers import AutoTokenizer

    from expert.quantize.report import weights_bytes

    device = torch.device("cpu" if args.smoke else "cuda")
    model_dir, out = Path(args.gptq_model), Path(args.out)
    rng = random.Random(3)
    lengths = json.loads(Path(args.lengths).read_text())["pubmedqa_train"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    vocab = len(tok)
    samples = []
    for n in lengths[:128]:
        n = min(n, 64 if args.smoke else 512)
        samples.append({"input_ids": torch.tensor([[rng.randrange(3, vocab) for _ in range(n)]]),
                        "attention_mask": torch.ones((1, n), dtype=torch.long)})
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if args.gptq_child == "ours":
        from expert.quantize.config import QuantizeConfig
        from expert.quantize.gptq import run_gptq

        import contextlib
        from unittest import mock

        from expert.quantize import gptq as gptq_module

        def with_pack_impl(*a, **k):
            config = real_config(*a, **k)
            config.pack_impl = args.gptq_pack_impl
            return config

        real_config = gptq_module.gptqmodel_config
        # Layer checkpoints need a streamed model: always so on a GPU, and in --smoke as if on one.
        streamed = mock.patch.object(gptq_module, "offload_to_disk", lambda model_dir: True) \
            if args.gptq_work and device.type == "cpu" else contextlib.nullcontext()
        with mock.patch.object(gptq_module, "gptqmodel_config", with_pack_impl) if args.gptq_pack_impl \
                else contextlib.nullcontext(), streamed:
            run_gptq(QuantizeConfig(group_size=128, num_samples=len(samples), max_length=512, perplexity_samples=0),
                     model_dir, samples, tok, out, work_dir=Path(args.gptq_work) if args.gptq_work else None)
    else:
        from gptqmodel import GPTQModel, QuantizeConfig as PeerConfig

        model = GPTQModel.load(str(model_dir), PeerConfig(group_size=128))
        model.quantize([{k: v[0].tolist() for k, v in s.items()} for s in samples], tokenizer=tok)
        model.save(str(out))
    seconds = time.perf_counter() - start
    import resource

    return {"seconds": round(seconds, 1), "pcre_shim": shim, "gptqmodel": gptqmodel.__version__,
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "checkpoint_gib": round(weights_bytes(model_dir) / 2**30, 2)}


def _gptq_train_child(args) -> dict:
    """The 33B preset's own path, which the training cases (NF4 bases built in place) never take:
    a GPTQ base loaded as the train stage loads it (gptqmodel's trainable kernel), LoRA steps on
    it, a checkpoint written and resumed, the base loaded again as the evaluation loads it
    (gptqmodel's inference kernel) and scored with and without prefix caches, then with the
    checkpoint's adapter (the expert's evaluation); and the same LoRA steps on an NF4 base of the
    same checkpoint, for the ratio of their speeds (the 33B figures above are NF4's)."""
    shim = _pcre_shim()
    import gptqmodel

    from expert.evaluation.scoring import Question, score_questions
    from expert.modeling import load_model
    from expert.quantize.config import QuantizeConfig
    from expert.quantize.nf4 import write_record
    from expert.train import TrainConfig
    from expert.train.data import IGNORE, EncodedSplit
    from expert.train.lora import attach_lora, make_optimizer, make_scheduler
    from expert.train.step import Runner, answer_loss_sum, collate

    device = torch.device("cpu" if args.smoke else "cuda")
    quantized, base, out = Path(args.gptq_model), Path(args.gptq_base), Path(args.out)
    vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    limit, steps = (64, 3) if args.smoke else (512, 6)
    examples = [e for e in _examples(json.loads(Path(args.lengths).read_text()), vocab, args.smoke)
                if len(e.input_ids) <= limit][:8]
    shared = collate(examples[:4], 0)
    labelled = int((shared["labels"] != IGNORE).sum())
    # The 33B preset's optimizer: bitsandbytes' paged 8-bit AdamW needs CUDA; its unpaged twin on the CPU.
    config = TrainConfig(lora_r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], micro_batch_size=4,
                         effective_batch_size=8, gradient_checkpointing=True, warmup_steps=0, learning_rate=1e-2,
                         max_length=limit, optimizer="paged_adamw_8bit" if device.type == "cuda" else "adamw_8bit")

    def quantized_kernels(model) -> list[str]:
        return sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")
                       or type(m).__name__ == "Linear4bit"})

    def train_on(model_dir: Path, resume: bool = False, compile: bool = False) -> dict:
        _phase(f"loading {model_dir.name} for training (compile {compile})")
        _sync(device)
        started = time.perf_counter()
        model, _ = load_model(model_dir, training=True, device=device.type)
        load_s = time.perf_counter() - started
        kernels = quantized_kernels(model)
        _phase(f"loaded in {load_s:.1f} s: {kernels}")
        torch.manual_seed(0)
        model = attach_lora(model, config.model_copy(update={"compile": compile}))
        model.train()
        with torch.no_grad(), _autocast(device):  # LoRA's B is 0: the quantized base's own loss
            initial = float(answer_loss_sum(model, shared, device) / labelled)
        optimizer = make_optimizer(config, model)
        scheduler = make_scheduler(config, optimizer, steps + 1)
        runner = Runner(model, optimizer, scheduler, EncodedSplit(examples, 0, []), pad_id=0, max_grad_norm=1.0)
        batches = [[0, 1, 2, 3], [4, 5, 6, 7]]
        losses, tokens, seconds, first_s = [], 0, 0.0, 0.0
        for i in range(steps):
            loss, n, s, _, _ = runner.step(batches)
            losses.append(round(loss, 4))
            if i > 0:  # the first step pays one-off kernel compilation (Triton, train.compile) and allocation
                tokens, seconds = tokens + n, seconds + s
            else:
                first_s = s
        # B of the first layer starts at 0 and moves only if the gradient came back through the
        # quantized layers above it: the kernel's backward works.
        first = model.get_base_model().model.layers[0].self_attn.q_proj
        moved = float(next(first.lora_B[name].weight for name in first.lora_B).detach().abs().sum())
        row = {"kernels": kernels, "optimizer": type(optimizer).__name__, "load_seconds": round(load_s, 1),
               "initial_loss": round(initial, 4), "losses": losses, "first_layer_lora_b_abs_sum": moved,
               "first_step_seconds": round(first_s, 2), "tokens_per_s": round(tokens / seconds, 1)}
        if resume:
            row["resume"] = _resume_check(runner, model, optimizer, scheduler, out / "checkpoints", steps, batches,
                                          shared, labelled)
        del runner, optimizer, model
        return row

    row = {"pcre_shim": shim, "gptqmodel": gptqmodel.__version__, "train_examples": len(examples),
           "gptq": train_on(quantized, resume=True)}
    _phase("trained: " + json.dumps(row))
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # The evaluation's loads, one per kernel of --gptq-eval-kernels (eval.gptq_kernel), no autocast
    # (eval.dtype). The first carries the checks below; the others are timed at the end, since a
    # kernel's first load may build it (Marlin's build: untimed, over 280 s once) and must not
    # starve the rest. Each prints its numbers as it ends: a call cut short keeps them in the log.
    rng = random.Random(4)
    prefix = [rng.randrange(3, vocab) for _ in range(48 if args.smoke else 600)]
    questions = [Question(prefix + [rng.randrange(3, vocab) for _ in range(rng.randrange(5, 40))],
                          [[3], [4], [5], [6]]) for _ in range(8 if args.smoke else 32)]
    kernels_wanted = args.gptq_eval_kernels.split(",")

    def infer_with(kernel: str) -> tuple[dict, object, list]:
        _phase(f"loading for inference with gptq_kernel {kernel} (a kernel may be built here)")
        _sync(device)
        started = time.perf_counter()
        model, _ = load_model(quantized, device=device.type, gptq_kernel=kernel)
        load_s = time.perf_counter() - started
        model = _CacheKwarg.wrap(model)
        _phase(f"loaded for inference in {load_s:.1f} s: {quantized_kernels(model)}")
        with torch.no_grad():
            loss = float(answer_loss_sum(model, shared, device) / labelled)
        times, cached = [], None
        for _ in range(2):  # the first pass pays one-off work (Triton's JIT, autotuning, allocation)
            _sync(device)
            started = time.perf_counter()
            cached = score_questions(model, questions, max_length=2048, groups=[list(range(len(questions)))])
            _sync(device)
            times.append(time.perf_counter() - started)
        info = {"gptq_kernel": kernel, "kernels": quantized_kernels(model), "load_seconds": round(load_s, 1),
                "loss": round(loss, 4), "loss_vs_training_kernel": round(loss - row["gptq"]["initial_loss"], 4),
                "first_scoring_seconds": round(times[0], 3), "questions_per_s": round(len(questions) / times[1], 1),
                "questions": len(questions)}
        _phase(f"inference with {kernel}: " + json.dumps(info))
        return info, model, cached

    row["eval"], model, cached = infer_with(kernels_wanted[0])
    plain = score_questions(model, questions, max_length=2048)
    row["eval"].update({
        "prefix_cache_same_predictions": sum(_argmax(a) == _argmax(b) for a, b in zip(cached, plain)),
        "prefix_cache_max_diff": max(abs(x - y) for a, b in zip(cached, plain) for x, y in zip(a, b))})
    del model
    # The expert's evaluation: the checkpoint's adapter on the inference kernel (PEFT wraps
    # gptqmodel's layer), which must give the loss the trained model gave, not the base's.
    checkpoint = Path(row["gptq"]["resume"].pop("checkpoint"))  # (a temporary folder: not for the result)
    model, _ = load_model(quantized, adapter_dir=checkpoint, device=device.type, gptq_kernel=kernels_wanted[0])
    model = _CacheKwarg.wrap(model)
    with torch.no_grad():
        adapted = float(answer_loss_sum(model, shared, device) / labelled)
    row["eval"]["adapter"] = {"loss": round(adapted, 4), "lora_layers": sum(1 for m in model.modules()
                                                                            if hasattr(m, "lora_A")),
                              "scores": len(score_questions(model, questions, max_length=2048,
                                                            groups=[list(range(len(questions)))]))}
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()

    if args.gptq_train_compile:  # train.compile on the GPTQ base: gptqmodel's kernels inside compiled layers
        row["gptq_compiled"] = train_on(quantized, compile=True)
        row["gptq_compiled_vs_eager_tokens_per_s"] = round(row["gptq_compiled"]["tokens_per_s"]
                                                           / row["gptq"]["tokens_per_s"], 2)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    nf4 = out / "nf4"
    write_record(QuantizeConfig(method="nf4"), base, nf4)
    row["nf4"] = train_on(nf4)
    row["gptq_vs_nf4_tokens_per_s"] = round(row["gptq"]["tokens_per_s"] / row["nf4"]["tokens_per_s"], 2)
    _phase("nf4 trained: " + json.dumps(row["nf4"]))

    for kernel in kernels_wanted[1:]:  # the other inference kernels, against the first one's predictions
        if device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            info, model, scores = infer_with(kernel)
        except Exception as exc:  # a kernel that cannot load or build here: said, and the rest kept
            info = {"gptq_kernel": kernel, "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
            _phase(f"inference with {kernel} failed: {info['error']}")
        else:
            info["same_predictions_as_first"] = sum(_argmax(a) == _argmax(b) for a, b in zip(scores, cached))
            del model
        row.setdefault("eval_other_kernels", []).append(info)
    return row


def _resume_check(runner, model, optimizer, scheduler, root: Path, step: int, batches, shared, labelled) -> dict:
    """The train stage's checkpoint of this run (adapter, optimizer state, scheduler, RNG) written,
    a step taken, the checkpoint loaded back: every adapter and optimizer tensor as it was saved,
    and the step taken again gives the loss it gave the first time (to float noise on a GPU)."""
    from peft import get_peft_model_state_dict

    from expert.train.checkpoint import _split_optimizer, load_checkpoint, save_checkpoint
    from expert.train.step import answer_loss_sum

    def snapshot() -> dict:
        tensors = {f"adapter/{k}": v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}
        return {**tensors, **{f"optimizer/{k}": v for k, v in _split_optimizer(optimizer.state_dict())[0].items()}}

    saved = snapshot()
    folder = save_checkpoint(root, step, model, optimizer, scheduler, {"step": step}, {"bench": "gptq"})
    first, *_ = runner.step(batches)
    load_checkpoint(folder, model, optimizer, scheduler)
    restored = snapshot()
    same = sum(1 for k in saved if k in restored and torch.equal(saved[k], restored[k]))
    model.eval()  # the checkpoint's own loss without dropout, for the evaluation's load to match
    with torch.no_grad(), runner.autocast():
        eval_loss = float(answer_loss_sum(model, shared, runner.device) / labelled)
    model.train()
    again, *_ = runner.step(batches)
    return {"tensors_restored": f"{same}/{len(saved)}", "loss_after_save": round(first, 6),
            "loss_after_resume": round(again, 6), "checkpoint": str(folder), "checkpoint_eval_loss": round(eval_loss, 4)}


def _identical_tensors(a: Path, b: Path) -> dict:
    """Tensors equal in both saved models, and each one's count under its side's name (its folder's:
    ours against peer, ours-checkpoint against ours)."""
    from safetensors.torch import load_file

    first, second = ({k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
                     for d in (a, b))
    same = sum(1 for k in first if k in second and first[k].shape == second[k].shape
               and torch.equal(first[k], second[k]))
    return {"identical": same, a.name: len(first), b.name: len(second)}


class _CacheKwarg(nn.Module):
    """transformers before 5.2x names the KV cache `past_key_values` (in and out), later `cache`;
    the project pins a later one, the GPU image may hold an earlier one (5.17). Every model the
    script scores with expert's scoring goes through `wrap`: the GPTQ check's did not, and its
    first prefix-cached scoring died on 5.17 (H200, 2026-11-28)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    @classmethod
    def wrap(cls, model):
        import inspect

        # A PEFT model's forward takes **kwargs whatever the version: ask the model it wraps.
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return model if "cache" in inspect.signature(base.forward).parameters else cls(model)

    def forward(self, **kwargs):
        if "cache" in kwargs:
            kwargs["past_key_values"] = kwargs.pop("cache")
        out = self.model(**kwargs)
        out.cache = out.past_key_values
        return out


class _Work(nn.Module):
    """Counts what the wrapped model was asked to compute: tokens through the layers and
    attention (query, key) pairs, dense, masked or not (a pack's mask hides most of its pairs,
    and the kernels compute them anyway). Turned into FLOPs, the rate says whether the GPU
    was kept busy on big matmuls (hundreds of TFLOP/s) or waited on something else."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config
        self.reset()

    def reset(self) -> None:
        self.tokens = self.pairs = self.forwards = 0

    def forward(self, **kwargs):
        q = kwargs["input_ids"].shape[-1]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None else 0
        self.tokens += kwargs["input_ids"].numel()
        self.pairs += kwargs["input_ids"].shape[0] * q * (past + q)
        self.forwards += 1
        return self.model(**kwargs)

    def summary(self, cfg, seconds: float) -> dict:
        """2 FLOPs per weight per token in the decoder layers (the LM head runs on scored rows only),
        and 4 * hidden per attention pair per layer (scores and weighted sum)."""
        layers_params = matmul_params(cfg) - cfg.hidden_size * cfg.vocab_size
        linear = 2 * layers_params * self.tokens
        attention = 4 * cfg.hidden_size * cfg.num_hidden_layers * self.pairs
        return {"forwards": self.forwards, "tokens": self.tokens, "attention_pairs": self.pairs,
                "tflop": float(f"{(linear + attention) / 1e12:.4g}"),
                "attention_share": round(attention / (linear + attention), 3),
                "tflop_per_s": float(f"{(linear + attention) / 1e12 / seconds:.4g}")}


def _argmax(row: list[float]) -> int:
    return max(range(len(row)), key=row.__getitem__)


# ---------------------------------------------------------------- plumbing

def _autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _device_name(device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        return f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    return f"CPU ({platform.machine()}), smoke run"


def _versions() -> dict:
    import peft
    import transformers

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "peft": peft.__version__}
    try:
        import bitsandbytes

        versions["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        versions["bitsandbytes"] = None
    return versions


def _command() -> str:
    """The command line, with folder arguments as placeholders (no paths of the machine)."""
    words, flag = ["python3", "bench/gpu.py"], None
    for word in sys.argv[1:]:
        words.append(flag.strip("-").replace("-", "_").upper() if flag else word)
        flag = word if word in ("--out", "--lengths", "--gptq-site") else None
    return " ".join(words)


def _summary(result: dict) -> list[dict]:
    """Each case in the bench result format (metric, unit, peer, ours, ratio, quality)."""
    rows = []
    for case in dict.fromkeys(r["case"] for r in result["train"]):
        sides = {r["side"]: r for r in result["train"] if r["case"] == case and "error" not in r}
        if {"peer", "ours"} <= set(sides):
            rows.append(_training_row(case, sides))
        if {"ours", "ours-compile"} <= set(sides):  # a row of its own: --sides may have left the peer out
            rows.append(_compiled_row(case, sides["ours"], sides["ours-compile"]))
        if {"ours-compile", "ours-budget"} <= set(sides):
            rows.append(_budget_row(case, sides["ours-compile"], sides["ours-budget"]))
    ev = result.get("eval") or {}
    if "ratio" in ev:
        rows.append({"metric": "MMLU-shaped 5-shot scoring, questions/s", "unit": "questions/s",
                     "peer": {"name": "lm-eval's log-likelihood path re-implemented (full logits, one forward per "
                              "context)", "value": ev["peer_questions_per_s"]},
                     "ours": {"value": ev["ours_questions_per_s"]}, "ratio": ev["ratio"],
                     "quality": {"same_prediction": ev["same_prediction"], "max_loglik_diff": ev["max_loglik_diff"]}})
    gptq = result.get("gptq") or {}
    if gptq.get("ratio"):
        rows.append({"metric": "GPTQ 4-bit quantization wall time", "unit": "s (ratio = peer / ours)",
                     "peer": {"name": "gptqmodel with its defaults", "value": gptq["peer"]["seconds"]},
                     "ours": {"value": gptq["ours"]["seconds"]}, "ratio": gptq["ratio"],
                     "quality": {"identical_tensors": gptq["identical_tensors"]}})
    return rows


def _training_row(case: str, sides: dict[str, dict]) -> dict:
    """Ours against the peer on one training case, in the bench result format."""
    peer, ours = sides["peer"], sides["ours"]
    losses = {"peer": peer["initial_loss"], "ours": ours["initial_loss"]}
    row = {"metric": f"LoRA training, useful (non-padding) tokens/s, {case}", "unit": "tokens/s",
           "peer": {"name": f"HF transformers + PEFT + bitsandbytes, micro-batch {peer['micro_batch']}",
                    "value": peer["tokens_per_s"]},
           "ours": {"value": ours["tokens_per_s"]}, "ratio": round(ours["tokens_per_s"] / peer["tokens_per_s"], 2),
           "quality": {"initial_loss": losses,
                       "same_objective": abs(losses["peer"] - losses["ours"]) <= 0.01 * abs(losses["peer"]),
                       "timed_mean_tokens": {"peer": peer["timed_mean_tokens"], "ours": ours["timed_mean_tokens"]},
                       # measured on a bigger card: the plan must keep the run under the limit
                       # (None: no peak measured, the CPU smoke run)
                       "ours_within_memory_limit": None if ours.get("peak_gib") is None
                       else ours["peak_gib"] <= MEMORY_LIMIT_GIB}}
    if "tokens_per_s" in sides.get("ours-divisor", {}):  # what the micro-batch that need not divide the step buys
        divisor = sides["ours-divisor"]
        row["uneven_micro_batches"] = {
            "ours": {"micro_batch": ours["micro_batch"], "tokens_per_s": ours["tokens_per_s"]},
            "divisor": {"micro_batch": divisor["micro_batch"], "tokens_per_s": divisor["tokens_per_s"]},
            "ratio": round(ours["tokens_per_s"] / divisor["tokens_per_s"], 2)}
    if "tokens_per_s" in sides.get("ours-whole", {}):  # what recomputing only the layers the micro-batch needs buys
        whole = sides["ours-whole"]
        row["partial_recompute"] = {
            side: {"micro_batch": r["micro_batch"], "gradient_checkpointing": r["gradient_checkpointing"],
                   "recomputed_layers": r.get("recomputed_layers"), "tokens_per_s": r["tokens_per_s"],
                   "probe_tokens_per_s": r["memory_plan"]["probe_tokens_per_s"]}
            for side, r in (("ours", ours), ("whole", whole))}
        row["partial_recompute"]["ratio"] = round(ours["tokens_per_s"] / whole["tokens_per_s"], 2)
    return row


def _budget_row(case: str, compiled: dict, budgeted: dict) -> dict:
    """train.compile_memory_budget against train.compile alone, in the bench result format: what
    recomputing the compiler's cheapest ops instead of whole layers buys (the micro-batch and the
    layers checkpointed each side's plan chose, under the same memory limit)."""
    def plan(row: dict) -> dict:
        return {"micro_batch": row["micro_batch"], "recomputed_layers": row.get("recomputed_layers"),
                "gradient_checkpointing": row["gradient_checkpointing"], "peak_gib": row.get("peak_gib")}

    return {"metric": f"Compiled training with a memory budget of {budgeted['compile_memory_budget']:g}, {case}",
            "unit": "useful tokens/s",
            "peer": {"name": "ours with train.compile, budget 1", "value": compiled["tokens_per_s"]},
            "ours": {"value": budgeted["tokens_per_s"]},
            "ratio": round(budgeted["tokens_per_s"] / compiled["tokens_per_s"], 2),
            "quality": {"initial_loss": {"compiled": compiled["initial_loss"], "budget": budgeted["initial_loss"]},
                        "plans": {"compiled": plan(compiled), "budget": plan(budgeted)}}}


def _compiled_row(case: str, eager: dict, compiled: dict) -> dict:
    """train.compile against the same code eager, in the bench result format: what compiling the
    decoder layers buys per step, and what it costs once (the first forward and the memory plan,
    where the compiling happens)."""
    losses = {"eager": eager["initial_loss"], "compiled": compiled["initial_loss"]}
    return {"metric": f"Compiled decoder layers vs eager, LoRA training useful tokens/s, {case}", "unit": "tokens/s",
            "peer": {"name": f"EXPERT eager (train.compile: false), micro-batch {eager['micro_batch']}",
                     "value": eager["tokens_per_s"]},
            "ours": {"value": compiled["tokens_per_s"], "micro_batch": compiled["micro_batch"]},
            "ratio": round(compiled["tokens_per_s"] / eager["tokens_per_s"], 2),
            "quality": {"initial_loss": losses,
                        "same_objective": abs(losses["eager"] - losses["compiled"]) <= 0.01 * abs(losses["eager"]),
                        "setup_seconds": {side: round(row["initial_seconds"] + row["plan_seconds"], 1)
                                          for side, row in (("eager", eager), ("compiled", compiled))},
                        "peak_gib": {"eager": eager.get("peak_gib"), "compiled": compiled.get("peak_gib")},
                        "compiled_within_memory_limit": None if compiled.get("peak_gib") is None
                        else compiled["peak_gib"] <= MEMORY_LIMIT_GIB}}


def _write(out: Path, result: dict) -> None:
    (out / "gpu.json").write_text(json.dumps(result, indent=1) + "\n")


def _print_table(result: dict) -> None:
    print(f"\n{result['machine']}  ({result['seconds']} s)")
    print(f"{'case':32} {'side':15} {'micro':>5} {'ckpt':>5} {'useful tok/s':>12} {'TFLOP/s':>8} {'pad':>6} "
          f"{'peak GiB':>8} {'job min':>8}")
    for r in result["train"]:
        if "error" in r:
            print(f"{r['case']:32} {r['side']:15} ERROR {r['error'][:80]}")
            continue
        # ckpt: True, False, or how many layers recompute when only the first ones do ("20L")
        ckpt = f"{r['recomputed_layers']}L" if r.get("recomputed_layers") else str(r["gradient_checkpointing"])
        print(f"{r['case']:32} {r['side']:15} {r['micro_batch']:>5} {ckpt:>5} "
              f"{r['tokens_per_s']:>12,.0f} {r['model_tflops']:>8} {r['padding_fraction']:>6} "
              f"{r.get('peak_gib') or '-':>8} {r['original_job_min']:>8}")
    by_case: dict[str, dict] = {}
    for r in result["train"]:
        by_case.setdefault(r["case"], {})[r["side"]] = r
    for case, sides in by_case.items():
        if all("tokens_per_s" in sides.get(s, {}) for s in ("peer", "ours")):
            print(f"ratio ours/peer {case}: {sides['ours']['tokens_per_s'] / sides['peer']['tokens_per_s']:.2f}")
        if all("initial_loss" in sides.get(s, {}) for s in ("peer", "ours")):
            print(f"  same batch before training: loss peer {sides['peer']['initial_loss']}, ours "
                  f"{sides['ours']['initial_loss']}; timed examples' mean tokens: peer "
                  f"{sides['peer']['timed_mean_tokens']}, ours {sides['ours']['timed_mean_tokens']}")
        if all("fresh_tokens_per_s" in sides.get(s, {}) for s in ("peer", "ours")):
            print(f"ratio ours/peer {case}, batches not seen before: "
                  f"{sides['ours']['fresh_tokens_per_s'] / sides['peer']['fresh_tokens_per_s']:.2f} "
                  f"(mean tokens: peer {sides['peer']['fresh_mean_tokens']}, ours {sides['ours']['fresh_mean_tokens']})")
        if all("tokens_per_s" in sides.get(s, {}) for s in ("ours", "ours-compile")):
            eager, compiled = sides["ours"], sides["ours-compile"]
            print(f"  compiled layers / eager {case}: {compiled['tokens_per_s'] / eager['tokens_per_s']:.2f} "
                  f"(first forward + memory plan: {compiled['initial_seconds'] + compiled['plan_seconds']:.1f} s "
                  f"compiled, {eager['initial_seconds'] + eager['plan_seconds']:.1f} s eager)")
        over = [s for s, r in sides.items() if s.startswith("ours") and (r.get("peak_gib") or 0) > MEMORY_LIMIT_GIB]
        if over:
            print(f"  PEAK OVER THE {MEMORY_LIMIT_GIB:g} GiB LIMIT the plan was made for: {', '.join(over)}")
    e = result["eval"] or {}
    if "error" in e:
        print(f"eval ERROR {e['error'][:200]}")
    elif e:
        print(f"MMLU-shaped eval: ours {e['ours_questions_per_s']} q/s (full MMLU {e['ours_full_mmlu_s']} s), "
              f"peer {e['peer_questions_per_s']} q/s (full {e['peer_full_mmlu_s']} s), ratio {e['ratio']}, "
              f"same prediction {e['same_prediction']}, max log-lik diff {e['max_loglik_diff']}")
        w = e["ours_work"]
        print(f"  ours computed {w['tflop']} TFLOP ({w['attention_share']:.0%} attention) at {w['tflop_per_s']} TFLOP/s"
              + (f"; ours' peak {e['ours_peak_gib']} GiB" if e.get("ours_peak_gib") else ""))


if __name__ == "__main__":
    main()
