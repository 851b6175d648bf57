"""Shared, built-once fixtures for the quantize and model-loading tests.

GPTQ on the tiny Llama takes ~10 s (plus ~30 s once per machine: gptqmodel compiles a small C++
extension on its first quantization), so the 4-bit folder is built once per test process and
shared by test_quantize.py and test_modeling.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from tests.fixtures.data import PUBMEDQA_LABELS, pubmedqa_record
from tests.fixtures.models import tiny_llama_dir

GROUP_SIZE = 32  # divides the tiny Llama's 64 and 128; a group size the CPU int4 kernel takes
PROBE = "Abstract: Patients with chronic disease were randomized.\nQuestion: Does the treatment reduce mortality?\nAnswer: yes"


@dataclass(frozen=True)
class TinySetup:
    base: Path  # plain HF folder
    data: Path  # train.parquet + dev.parquet (prompt, answer)
    gptq: Path  # 4-bit GPTQ folder written by quantize()
    summary: dict


_BUILT: dict[str, TinySetup] = {}


def write_task_data(folder: Path, n_train: int = 64, n_dev: int = 8) -> Path:
    """PubMedQA-format train/dev splits (the columns the quantize stage reads), lm-eval template."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, first, n in (("train", 0, n_train), ("dev", 1000, n_dev)):
        recs = [pubmedqa_record(first + i, PUBMEDQA_LABELS[i % 3], sections=1 + i % 3) for i in range(n)]
        prompts = ["Abstract: " + "\n".join(r["CONTEXTS"]) + f"\nQuestion: {r['QUESTION']}\nAnswer:" for r in recs]
        table = pa.table({"id": [str(first + i) for i in range(n)], "split": [split] * n,
                          "prompt": prompts, "answer": [r["final_decision"] for r in recs]})
        pq.write_table(table, folder / f"{split}.parquet")
    return folder


def tiny_setup(tmp_path_factory) -> TinySetup:
    """The tiny Llama, task data, and its 4-bit GPTQ quantization (built once per process)."""
    if "setup" not in _BUILT:
        from expert.quantize import QuantizeConfig, quantize

        root = tmp_path_factory.mktemp("quantize")
        base = tiny_llama_dir(root / "base", seed=0)
        data = write_task_data(root / "data")
        config = QuantizeConfig(group_size=GROUP_SIZE, num_samples=64, perplexity_samples=8)
        summary = quantize(config, base, data, root / "gptq")
        _BUILT["setup"] = TinySetup(base=base, data=data, gptq=root / "gptq", summary=summary)
    return _BUILT["setup"]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@torch.no_grad()
def logits(model, tokenizer, text: str = PROBE) -> torch.Tensor:
    return model(input_ids=tokenizer(text, return_tensors="pt")["input_ids"]).logits
