"""Benchmark: `expert export --merge` (the streamed merge) vs PEFT's merge_and_unload + save_pretrained.

Both sides fold the same LoRA adapter into the same base and write a transformers model folder in
the same dtype. Ours is `expert.export_merge.merge_adapter`: each base tensor read (a GPTQ layer
dequantized), B·A·scaling added, and written into its shard one at a time. The peer is what users
write with PEFT: the base loaded whole at that dtype (a GPTQ base: loaded 4-bit on the CPU and
dequantized layer by layer into plain linear layers first, since PEFT cannot merge into GPTQ
layers), `PeftModel.from_pretrained(...).merge_and_unload()`, `save_pretrained`. Each side runs
in a fresh process; its peak RSS (VmHWM) above its RSS after imports is the memory it took,
and its wall time (imports excluded) the time. Quality check: the written tensors, bit for bit
(in float32 the two agree exactly; in bf16 the peer rounds twice, ours once).

    python bench/merge.py                       # the newest artifacts/select/KEY (after `make run`)
    python bench/merge.py --model artifacts/quantize/KEY --adapter artifacts/select/KEY/adapter --dtype bfloat16

Each side runs --rounds times (3 by default), alternating which goes first; the median run of
each side is the figure and every run is kept in the result.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

from common import (alternating_rounds, command_line, describe_machine, median_run, newest_artifact,  # bench/ is on sys.path
                    peak_rss_kib, print_child_result, run_child, work_dir, write_result)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    args = _parser().parse_args()
    if args.child:
        print_child_result(_child(args))
        return
    with work_dir("bench-merge-", args.work) as work:
        model, adapter = _synthetic(args.synthetic, args.dtype, work) if args.synthetic else _inputs(args)
        def merge(side: str, round_: int) -> dict:
            cmd = [sys.executable, __file__, "--child", side, "--model", str(model), "--adapter", str(adapter),
                   "--dtype", args.dtype, "--child-out", str(work / f"{side}-{round_}")]
            return run_child(cmd, side)[0]

        runs = alternating_rounds(args.rounds, ("peer", "ours"), merge)
        quality = _same_tensors(work / "ours-0", work / "peer-0")
    median = {side: median_run(rows) for side, rows in runs.items()}
    write_result(args.out, _result(args, median, runs, quality))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="the base model artifact, artifacts/quantize/KEY (default: the one the "
                                   "newest select artifact was trained on)")
    p.add_argument("--adapter", help="a LoRA adapter folder (default: the newest select artifact's adapter/)")
    p.add_argument("--dtype", default="float32", help="the merged model's dtype (float32, bfloat16, float16)")
    p.add_argument("--synthetic", choices=sorted(SYNTHETIC),
                   help="instead of a store's model and adapter: a random float Llama of this shape, stored in "
                        "--dtype, and a random LoRA adapter (r 16, all linear layers), built in the work folder")
    p.add_argument("--rounds", type=int, default=3, help="runs per side, alternating which goes first (median)")
    p.add_argument("--work", help="folder for the merged models, kept (default: a temp folder, removed)")
    p.add_argument("--out", default=str(ROOT / "bench/results/merge_smollm2_cpu.json"))
    p.add_argument("--child", choices=("ours", "peer"), help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    return p


# hidden, intermediate, layers, heads, kv heads, vocabulary
SYNTHETIC = {"tiny": (64, 128, 2, 4, 2, 256), "tinyllama-1.1b": (2048, 5632, 22, 32, 4, 32000)}


def _synthetic(shape: str, dtype: str, work: Path) -> tuple[Path, Path]:
    """A random Llama of `shape` (saved as transformers saves it) and a LoRA adapter on it whose B
    is random too (PEFT starts B at zero, which would merge nothing)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv, vocab = SYNTHETIC[shape]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config)
    model.to(getattr(torch, dtype)).save_pretrained(work / "base")
    # Any tokenizer does for a merge, which only copies it: one word per id.
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="w0").save_pretrained(work / "base")
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(work / "adapter")
    return work / "base", work / "adapter"


def _inputs(args) -> tuple[Path, Path]:
    """The base artifact and the adapter: as given, or the newest selection's."""
    if args.model and args.adapter:
        return Path(args.model), Path(args.adapter)
    select = newest_artifact("select")
    key = json.loads((select / "manifest.json").read_text())["upstream"]["model"].split("@")[0]
    model = next(p for p in (ROOT / "artifacts").glob(f"*/{key}") if (p / "manifest.json").is_file())
    return Path(args.model or model), Path(args.adapter or select / "adapter")


def _child(args) -> dict:
    import torch
    from peft import PeftModel  # noqa: F401 (imports are not timed)

    from expert.export_merge import merge_adapter
    from expert.modeling import load_model, model_kind, resolve_base  # noqa: F401
    from expert.train.frozen import dense_gptq_layers  # noqa: F401

    model_dir, adapter, out = Path(args.model), Path(args.adapter), Path(args.child_out)
    kind, dtype = model_kind(model_dir), getattr(torch, args.dtype)
    imports_kib = peak_rss_kib()
    start = time.perf_counter()
    if args.child == "ours":
        merge_adapter(model_dir, kind, adapter, out, args.dtype)
    else:
        if kind == "gptq":
            model, tokenizer = load_model(model_dir, training=True, device="cpu", dtype=args.dtype)
            dense_gptq_layers(model, dtype)
            # plain layers only now: PEFT merges once the model no longer says it is GPTQ
            model.hf_quantizer, model.quantization_method, model.is_quantized = None, None, False
            del model.config.quantization_config
        else:
            model, tokenizer = load_model(resolve_base(model_dir), device="cpu", dtype=args.dtype)
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        merged.save_pretrained(out, max_shard_size="5GB")
        tokenizer.save_pretrained(out)
    seconds = time.perf_counter() - start
    peak_kib = peak_rss_kib()
    return {"seconds": seconds, "kind": kind, "peak_rss_mib": peak_kib / 1024,
            "rss_after_imports_mib": imports_kib / 1024, "merge_rss_mib": (peak_kib - imports_kib) / 1024,
            "written_mib": sum(p.stat().st_size for p in out.glob("*.safetensors")) / 2**20}


def _same_tensors(ours: Path, peer: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    def tensors(folder: Path) -> dict:
        found: dict = {}
        for path in sorted(folder.glob("*.safetensors")):
            found.update(load_file(path))
        return found

    a, b = tensors(ours), tensors(peer)
    common = sorted(set(a) & set(b))
    return {
        "tensors": len(common), "only_ours": sorted(set(a) - set(b)), "only_peer": sorted(set(b) - set(a)),
        "identical": sum(torch.equal(a[k], b[k]) for k in common),
        "max_abs_diff": max((float((a[k].float() - b[k].float()).abs().max()) for k in common if a[k].numel()),
                            default=0.0),
    }


def _result(args, median: dict, runs: dict, quality: dict) -> dict:
    import peft
    import torch
    import transformers

    kind = median["ours"]["kind"]
    return {
        "metric": f"memory taken by merging a LoRA adapter into a {kind} base"
                  + (f" (a random {args.synthetic}-shaped Llama, LoRA r16 on all linear layers)" if args.synthetic else "")
                  + f" and writing the model in {args.dtype} "
                  f"(peak RSS above the RSS after imports); median run of {args.rounds} per side by wall time",
        "unit": "MiB (lower is better; ratio = peer / ours)",
        "peer": {"name": f"PEFT {peft.__version__} merge_and_unload + save_pretrained (the base loaded whole"
                         + (", GPTQ layers dequantized first)" if kind == "gptq" else ")"),
                 "value": median["peer"]["merge_rss_mib"]},
        "ours": {"value": median["ours"]["merge_rss_mib"]},
        # ru_maxrss counts KiB, and a tiny merge may not raise the peak at all: under 1 MiB counts as 1
        "ratio": median["peer"]["merge_rss_mib"] / max(median["ours"]["merge_rss_mib"], 1.0),
        "time_s": {side: row["seconds"] for side, row in median.items()},
        "time_ratio": median["peer"]["seconds"] / max(median["ours"]["seconds"], 1e-3),
        "written_mib": median["ours"]["written_mib"],
        "quality": quality,
        "machine": describe_machine(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__},
        "command": command_line("merge.py", args, _parser(), {"model": "BASE_DIR", "adapter": "ADAPTER_DIR"}),
        "date": datetime.date.today().isoformat(),
        "runs": runs,
    }


if __name__ == "__main__":
    main()
