"""Fixtures of the training tests: a learnable PubMedQA-format task in train/dev Parquet.

The answer is decided by one word of the question ("treatment" -> yes, "biomarker" -> no,
"method" -> maybe), so even a tiny random model learns it in a few steps. Abstracts have
1 to 4 sentences, so lengths vary and bucketing has something to do.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from expert.benchmarks.pubmedqa import TEMPLATES
from expert.benchmarks.schema import PUBMEDQA_SCHEMA, write_parquet

WORDS = {"yes": "treatment", "no": "biomarker", "maybe": "method"}
_SENTENCE = "Patients with chronic disease were randomized in a clinical trial."


def toy_rows(n: int, split: str, first_id: int = 0) -> dict[str, list]:
    cols: dict[str, list] = {name: [] for name in PUBMEDQA_SCHEMA.names}
    for i in range(first_id, first_id + n):
        answer = list(WORDS)[i % 3]
        contexts = [_SENTENCE] * (1 + (i * 7) % 4)
        question = f"Does the {WORDS[answer]} reduce mortality in adults?"
        prompt = TEMPLATES["lm-eval"].format(contexts="\n".join(contexts), question=question)
        row = {"id": str(1000 + i), "split": split, "prompt": prompt, "answer": answer,
               "choices": list(WORDS), "question": question, "contexts": contexts,
               "truncated": False, "source": "pqa_l"}
        for key, value in row.items():
            cols[key].append(value)
    return cols


def write_toy_data(path: Path, n_train: int = 24, n_dev: int = 6) -> Path:
    """train.parquet and dev.parquet of the toy task in folder `path`; returns it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_parquet(path / "train.parquet", toy_rows(n_train, "train"), PUBMEDQA_SCHEMA)
    write_parquet(path / "dev.parquet", toy_rows(n_dev, "dev", first_id=n_train), PUBMEDQA_SCHEMA)
    return path


def plain_load(model_dir: Path, device: str = "cpu"):
    """Plain transformers loading of a tiny float32 folder (what load_model does for it on CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32"), AutoTokenizer.from_pretrained(model_dir)


# Fixtures shared by the training test modules (import them by name into a test module).

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Bitwise comparisons need the same kernels; a 64-wide model gains nothing from threads,
    and on a busy machine they only spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from tests.fixtures.models import tiny_llama_dir

    return tiny_llama_dir(tmp_path_factory.mktemp("llama"))
