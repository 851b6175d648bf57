"""Texts for the quantize stage: GPTQ calibration samples and held-out perplexity texts.

Domain calibration by default: GPTQ fits each layer to the activations it sees, so samples of the
task's own training texts (PubMedQA `prompt + " " + answer`) keep the quantization error small
where the expert will work. A generic text file (one long text, e.g. a Wikipedia dump) is cut
into windows at seeded random offsets, as the GPTQ paper samples C4 or WikiText.

    texts = task_texts(data_dir / "train.parquet", n=128, seed=0)
    samples = tokenize_samples(texts, tokenizer, max_length=512)
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from expert.errors import ConfigError, DataError


def calibration_texts(calibration: str, data_dir: Path | None, tokenizer: Any, n: int,
                      max_length: int, seed: int) -> tuple[list[str], str]:
    """(texts, description) for `QuantizeConfig.calibration` ("task" or a text file's path)."""
    if calibration == "task":
        if data_dir is None:
            raise ConfigError("quantize.calibration is 'task' but the stage got no data folder; give "
                              "it the formatted PubMedQA folder, or set calibration to a text file")
        path = Path(data_dir) / "train.parquet"
        texts = task_texts(path, n, seed)
        return texts, f"task: {len(texts)} of {path.name} (prompt + ' ' + answer)"
    path = Path(calibration)
    return file_windows(path, tokenizer, n, max_length, seed), f"file: {path.name}, {n} windows"


def task_texts(path: Path, n: int, seed: int) -> list[str]:
    """`n` seeded picks of `prompt + " " + answer` from a formatted split (all if it has fewer)."""
    texts = _read_split(path)
    if n < len(texts):
        texts = random.Random(seed).sample(texts, n)
    return texts


def file_windows(path: Path, tokenizer: Any, n: int, max_length: int, seed: int) -> list[str]:
    """`n` windows of `max_length` tokens at seeded offsets of the text file `path`."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"quantize.calibration: cannot read {path} as UTF-8 text ({exc}); set it to "
                          "'task' or to a readable text file") from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < 8:
        raise DataError(f"calibration file {path} holds {len(ids)} tokens; give it at least a few "
                        "paragraphs of text")
    rng = random.Random(seed)
    span = min(max_length, len(ids))
    starts = [rng.randrange(len(ids) - span + 1) for _ in range(n)]
    return [tokenizer.decode(ids[s:s + span]) for s in starts]


def heldout_texts(data_dir: Path | None, n: int, seed: int) -> list[str]:
    """Up to `n` seeded picks of the dev split's `prompt + " " + answer` (never train or test)."""
    if data_dir is None or n == 0:
        return []
    return task_texts(Path(data_dir) / "dev.parquet", n, seed)


def tokenize_samples(texts: list[str], tokenizer: Any, max_length: int) -> list[dict[str, torch.Tensor]]:
    """Token batches of one text each, cut to `max_length` tokens (the head: where the abstract is)."""
    samples = []
    for text in texts:
        enc = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)
        if enc["input_ids"].shape[1] >= 2:
            samples.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    if not samples:
        raise DataError("no calibration text is at least 2 tokens long; check the calibration source")
    return samples


def _read_split(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path} does not exist; the quantize stage reads the formatted data folder "
                        "(run the format stage first, or set quantize.calibration to a text file)")
    try:
        table = pq.read_table(path, columns=["prompt", "answer"])
    except Exception as exc:  # pyarrow raises several types for a bad or foreign file
        raise DataError(f"{path} is not a formatted split with 'prompt' and 'answer' columns ({exc}); "
                        "rerun the format stage") from None
    rows = table.to_pydict()
    texts = [f"{p} {a}" for p, a in zip(rows["prompt"], rows["answer"]) if p]
    if not texts:
        raise DataError(f"{path} has no rows; the format stage wrote an empty split")
    return texts
