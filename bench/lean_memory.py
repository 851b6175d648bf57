"""Benchmark: what a decoder layer keeps for the backward, per token, with and without lean activations.

Without gradient checkpointing the activations autograd keeps decide the largest micro-batch;
with it, every layer's forward runs twice. Both sides are the same model as the GPU training
case: a Llama block of the given shape in bfloat16, LoRA r16 on all linear layers with dropout
0.05 (PEFT, its float32 LoRA weights), under bfloat16 autocast, as `expert.train` runs on a GPU.
- peer: transformers + PEFT as they come (what Trainer + PEFT trains);
- ours: the same model after `expert.train.lean.make_lean`, as `expert.train` trains it.

The metric is the bytes of the distinct tensors autograd keeps (`saved_tensors_hooks`, weights
excluded), per token and per decoder layer: the difference between a 2-layer and a 1-layer
model, so embeddings, final norm and loss do not count. It is counted, not timed, so a CPU
measures what a GPU would keep: the dropout masks are redrawn in the backward as on a GPU (the CPU
training path keeps them, `expert.train.lean.REDRAW_MASK_ON`), and CUDA's flash attention keeps
its output and log-sum-exp as the CPU kernel does. The quality check: the same loss and gradients to rounding.

    .venv/bin/python bench/lean_memory.py            # Llama-3 8B and SmolLM2-135M shapes
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import sys
from pathlib import Path

from common import command_line, describe_machine, write_result  # bench/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {  # hidden, intermediate, heads, kv heads
    "llama3-8b": (4096, 14336, 32, 8),
    "smollm2-135m": (576, 1536, 9, 3),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(shape: str, layers: int):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, heads, kv = SHAPES[shape]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                         num_key_value_heads=kv, num_hidden_layers=layers, vocab_size=512,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS))
    with torch.no_grad():  # B starts at zero; non-zero B makes the gradient check meaningful
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model.train()


def kept_bytes(model, ids) -> tuple[int, object, dict]:
    """(bytes autograd keeps, loss, LoRA gradients) of one forward + backward."""
    import torch

    from expert.train.lean import counting_kept_bytes

    torch.manual_seed(1)
    with counting_kept_bytes(model) as kept:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return sum(kept.values()), loss.detach().float(), grads


def measure(shape: str, tokens: int) -> dict:
    import torch

    from expert.train import lean
    from expert.train.lean import make_lean

    lean.REDRAW_MASK_ON = frozenset({"cpu", "cuda"})  # count what a GPU keeps (the CPU keeps the masks)

    ids = torch.randint(0, 512, (1, tokens), generator=torch.Generator().manual_seed(0))
    per_layer = {}
    for side in ("peer", "ours"):
        sizes = []
        for layers in (1, 2):
            model = build(shape, layers)
            if side == "ours":
                make_lean(model)
            sizes.append(kept_bytes(model, ids)[0])
            del model
        per_layer[side] = (sizes[1] - sizes[0]) / tokens / 1024
    worst = _grad_check(shape, ids)  # dropout masks are drawn differently: checked without dropout
    return {"shape": shape, "tokens": tokens,
            "peer_kib_per_token_layer": round(per_layer["peer"], 1),
            "ours_kib_per_token_layer": round(per_layer["ours"], 1),
            "ratio": round(per_layer["peer"] / per_layer["ours"], 2),
            "quality": {"same_loss_without_dropout": worst["same_loss"],
                        "max_grad_diff_of_max": worst["max_grad_diff_of_max"]}}


def _grad_check(shape: str, ids) -> dict:
    """Without dropout: the loss bitwise, and the worst LoRA gradient difference relative to its largest entry."""
    import torch

    from expert.train.lean import make_lean

    plain = build(shape, 2)
    for module in plain.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    lean = copy.deepcopy(plain)
    make_lean(lean)
    _, loss_p, grads_p = kept_bytes(plain, ids)
    _, loss_l, grads_l = kept_bytes(lean, ids)
    worst = max(float((grads_l[n] - grads_p[n]).abs().max() / grads_p[n].abs().max()) for n in grads_p)
    return {"same_loss": bool(torch.equal(loss_p, loss_l)), "max_grad_diff_of_max": round(worst, 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--tokens", type=int, default=256, help="tokens of the measured batch")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "lean_memory.json"))
    args = p.parse_args()
    import peft
    import torch
    import transformers

    rows = [measure(shape, args.tokens) for shape in args.shapes.split(",")]
    for row in rows:
        print(f"{row['shape']}: peer {row['peer_kib_per_token_layer']} KiB, ours {row['ours_kib_per_token_layer']} "
              f"KiB per token per layer ({row['ratio']}x less); {row['quality']}", flush=True)
    main_row = rows[0]
    write_result(args.out, {
        "metric": f"activation memory kept for the backward, per token per decoder layer ({main_row['shape']} "
                  "shape, bf16 base, LoRA r16 all linear, dropout 0.05, bf16 autocast)",
        "unit": "KiB (lower is better; ratio = peer / ours)",
        "peer": {"name": "transformers + PEFT as they come", "value": main_row["peer_kib_per_token_layer"]},
        "ours": {"value": main_row["ours_kib_per_token_layer"]},
        "ratio": main_row["ratio"],
        "quality": main_row["quality"],
        "shapes": rows,
        "machine": describe_machine(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__},
        "command": command_line("lean_memory.py", args, p),
        "date": datetime.date.today().isoformat(),
    })


if __name__ == "__main__":
    main()
