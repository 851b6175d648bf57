"""PubMedQA (PQA-L, 1,000 expert-labelled questions) formatted into Parquet.

Reads the authors' `ori_pqal.json` or a folder holding the Hugging Face `qiaojin/PubMedQA`
`pqa_labeled` parquet, rebuilds the official split (500 test, 500 cross-validation pool cut
into 10 folds of 50; dev = fold k, train = the other nine) and writes `train.parquet`,
`dev.parquet`, `test.parquet` and `stats.json`. Prompts use the reasoning-required setting:
question and abstract, never the long answer (which holds the conclusion). `max_prompt_tokens`
cuts train prompts only: dev and test keep the full abstract, as lm-eval and the published
results score it. From the full PQA-L, the test split is checked against a digest of the
authors' 500 test PMIDs, so a source that stores the records in another order (the split
depends on it) fails instead of silently scoring other questions. PQA-A questions
added to train (`extra_source`, 211k of them) stream through: read one record at a time and
written CHUNK_ROWS at a time, so memory stays flat (bench/format_scale.py measures it).

    format_pubmedqa(PubMedQAConfig(fold=0), Path("ori_pqal.json"), Path("out"))
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator

from pydantic import Field, field_validator

from expert.benchmarks.pubmedqa_records import LABELS, Record, iter_records, load_records
from expert.benchmarks.schema import PUBMEDQA_SCHEMA, ParquetSink, write_parquet, write_stats
from expert.config import StageConfig
from expert.errors import ConfigError, DataError

__all__ = ["LABELS", "TEMPLATES", "PubMedQAConfig", "Record", "check_official_test", "format_pubmedqa",
           "iter_records", "load_records", "official_split", "pmid_digest"]

SPLITS = ("train", "dev", "test")
NUM_FOLDS = 10
SPLIT_SEED = 0  # the authors' random.seed(0)
CHUNK_ROWS = 10_000  # PQA-A records formatted and written at a time, so memory stays flat
# The split's test half depends on the order of the records (it shuffles them as stored), so
# these digests (pmid_digest) tell the real PQA-L and its official test split apart from a copy
# that stores the same records in another order. Computed once from the authors'
# ori_pqal.json and test_ground_truth.json (github.com/pubmedqa/pubmedqa, MIT).
PQA_L_PMIDS_SHA256 = "7a6c316c94747ae97a9f55b7d28908884db6bf7cf13fcce4b969943c9cb1cf94"  # its 1,000 PMIDs
OFFICIAL_TEST_PMIDS_SHA256 = "406e3b89eff577ed38571eca5a5819734a6f49ac0437d171b6c64e5c3cd195f8"  # the 500 of test
# Only the train split is cut to max_prompt_tokens: the budget bounds training memory, and the
# published results that dev and test are compared with score the whole abstract.
BUDGETED_SPLITS = ("train",)

# Named prompt templates; {contexts} is the abstract's sections joined by newlines.
TEMPLATES = {
    # lm-evaluation-harness's pubmedqa doc_to_text.
    "lm-eval": "Abstract: {contexts}\nQuestion: {question}\nAnswer:",
}

class PubMedQAConfig(StageConfig):
    """How to format PubMedQA."""

    source: str = Field(
        "https://raw.githubusercontent.com/pubmedqa/pubmedqa/master/data/ori_pqal.json",
        description="ori_pqal.json as a path or URL, or hf:qiaojin/PubMedQA (resolved by the caller)",
    )
    fold: int = Field(0, ge=0, le=NUM_FOLDS - 1,
                      description="CV fold of the official split: dev = fold k (50), train = the other 9 (450)")
    template: str = Field("lm-eval", description=f"prompt template, one of: {', '.join(TEMPLATES)}")
    extra_train_source: str | None = Field(None, description="optional PQA-A ori_pqaa.json, appended to train")
    max_prompt_tokens: int | None = Field(
        None, gt=0,
        description="token budget for prompt + answer + EOS of the train split (bounds training memory): cuts "
                    "the end of long abstracts, never the question; dev and test keep the full abstract, as "
                    "the published results score it; needs the model's tokenizer",
    )

    @field_validator("template")
    @classmethod
    def _known_template(cls, value: str) -> str:
        if value not in TEMPLATES:
            raise ValueError(f"unknown template {value!r}; choose one of: {', '.join(sorted(TEMPLATES))}")
        return value


# ---------------------------------------------------------------- the official split

def official_split(records: list[Record], fold: int) -> dict[str, list[Record]]:
    """The split of the authors' preprocess/split_dataset.py: one random stream seeded 0,
    first split into 2 halves (CV pool, test), then the CV pool into 10 folds."""
    rng = random.Random(SPLIT_SEED)
    cv_pool, test = _stratified_split(records, 2, rng)
    folds = _stratified_split(cv_pool, NUM_FOLDS, rng)
    train = [r for k, part in enumerate(folds) if k != fold for r in part]
    return {"train": train, "dev": folds[fold], "test": test}


def pmid_digest(pmids: Iterable[str]) -> str:
    """sha256 of the PMIDs sorted as strings and joined by newlines: a set's fingerprint."""
    return hashlib.sha256("\n".join(sorted(pmids)).encode()).hexdigest()


def check_official_test(source: Path, pmids: list[str], test_pmids: list[str], pqa_l_digest: str,
                        test_digest: str) -> None:
    """When `pmids` are the full PQA-L (by `pqa_l_digest`), the test split made from them must be
    the official one (by `test_digest`); other inputs (fixtures, subsets) are not checked."""
    if pmid_digest(pmids) != pqa_l_digest or pmid_digest(test_pmids) == test_digest:
        return
    raise DataError(f"{source} holds the 1,000 PQA-L questions, but in an unexpected order (or with changed "
                    "labels): the official split shuffles the records as stored, so its test split is not the "
                    "authors' 500 questions and the scores would not compare with published ones. Use the "
                    "authors' ori_pqal.json (the default data.pubmedqa.source), or restore its record order")


def _stratified_split(items: list[Record], parts: int, rng: random.Random) -> list[list[Record]]:
    """Per label (yes, no, maybe): shuffle, cut into chunks of ceil(n/parts), the last chunk
    taking the rest; part i = chunk i of every label. If that leaves the last part smaller
    than the first, one random member of each other part moves to the last."""
    out: list[list[Record]] = [[] for _ in range(parts)]
    for label in LABELS:
        group = [r for r in items if r.label == label]
        rng.shuffle(group)
        size = math.ceil(len(group) / parts)
        for i in range(parts):
            out[i].extend(group[i * size:(i + 1) * size] if i < parts - 1 else group[i * size:])
    if len(out[-1]) != len(out[0]):
        for part in out[:-1]:
            # The authors' random.choice would fail on an empty part (only tiny inputs have
            # one); skipping it keeps the real 1,000-record split identical.
            if part:
                out[-1].append(part.pop(part.index(rng.choice(part))))
    return out


# ---------------------------------------------------------------- prompts

def render(template: str, question: str, contexts_text: str) -> str:
    return TEMPLATES[template].format(contexts=contexts_text, question=question)


class _Budget:
    """Token accounting: the prompt (with the tokenizer's own special tokens, e.g. BOS), then
    the longest " answer", then EOS, must fit in `max_tokens`."""

    def __init__(self, tokenizer: Any, max_tokens: int):
        self.tokenizer, self.max_tokens = tokenizer, max_tokens
        self.answer = 1 + max(len(tokenizer(" " + c, add_special_tokens=False)["input_ids"]) for c in LABELS)

    def excess(self, prompts: list[str]) -> list[int]:
        """Tokens over budget, per prompt (<= 0: it fits)."""
        return [len(ids) + self.answer - self.max_tokens for ids in self.tokenizer(prompts)["input_ids"]]


def _prompts(records: list[Record], template: str, tokenizer: Any,
             max_tokens: int | None) -> tuple[list[str], list[bool]]:
    texts = ["\n".join(r.contexts) for r in records]
    prompts = [render(template, r.question, t) for r, t in zip(records, texts)]
    truncated = [False] * len(records)
    if max_tokens is None or not records:
        return prompts, truncated
    budget = _Budget(tokenizer, max_tokens)
    excess = budget.excess(prompts)
    over = [i for i, e in enumerate(excess) if e > 0]
    if over:
        spans = tokenizer([texts[i] for i in over], add_special_tokens=False, return_offsets_mapping=True)
        for i, offsets in zip(over, spans["offset_mapping"]):
            prompts[i] = _cut(records[i], template, texts[i], offsets, excess[i], budget)
            truncated[i] = True
    return prompts, truncated


def _cut(rec: Record, template: str, text: str, offsets: list, excess: int, budget: _Budget) -> str:
    """Drop abstract tokens from the end until the prompt fits. The question and "Answer:"
    are never cut. Tokens do not add up exactly across the cut, hence the loop."""
    keep = len(offsets) - excess
    while keep > 0:
        prompt = render(template, rec.question, text[: offsets[keep - 1][1]])
        over = budget.excess([prompt])[0]
        if over <= 0:
            return prompt
        keep -= over
    bare = budget.excess([render(template, rec.question, "")])[0] + budget.max_tokens
    raise ConfigError(f"max_prompt_tokens={budget.max_tokens} leaves no room for the abstract of PMID {rec.pmid} "
                      f"(its question, template and answer alone take {bare} tokens); raise it")


# ---------------------------------------------------------------- formatting

def format_pubmedqa(config: PubMedQAConfig, source: Path, out_dir: Path, tokenizer: Any = None,
                    extra_source: Path | None = None) -> dict:
    """Write train/dev/test Parquet and stats.json into `out_dir`; return the stats."""
    if config.max_prompt_tokens is not None and tokenizer is None:
        raise ConfigError("data.pubmedqa.max_prompt_tokens is set but no tokenizer was given: "
                          "pass the model's tokenizer, or unset max_prompt_tokens")
    if config.max_prompt_tokens is not None and not getattr(tokenizer, "is_fast", False):
        raise ConfigError("data.pubmedqa.max_prompt_tokens needs a fast tokenizer (it cuts at token offsets); "
                          "load the tokenizer with AutoTokenizer.from_pretrained(dir), which gives one")
    if (config.extra_train_source is None) != (extra_source is None):
        raise ConfigError("data.pubmedqa.extra_train_source and the extra_source file must be given together")
    records = load_records(source, "pqa_l")
    splits = official_split(records, config.fold)
    check_official_test(source, [r.pmid for r in records], [r.pmid for r in splits["test"]],
                        PQA_L_PMIDS_SHA256, OFFICIAL_TEST_PMIDS_SHA256)
    for name in ("dev", "test") if extra_source is not None else SPLITS:
        _check_not_empty(source, len(records), name, len(splits[name]), config.fold)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats: dict[str, Any] = {"benchmark": "pubmedqa", "fold": config.fold, "template": config.template,
                             "max_prompt_tokens": config.max_prompt_tokens,
                             "max_prompt_tokens_splits": list(BUDGETED_SPLITS), "pqa_a_dropped_overlap": 0,
                             "splits": {}}
    for name in ("dev", "test"):
        stats["splits"][name] = _write_split(out_dir, name, splits[name], config, tokenizer)
    train: Iterable[Record] = splits["train"]
    if extra_source is not None:
        # PQA-A streams in, never all in memory.
        train = itertools.chain(splits["train"], _new_records(iter_records(extra_source, "pqa_a"), records, stats))
    stats["splits"]["train"] = _write_chunked(out_dir, "train", train, config, tokenizer)
    if extra_source is not None:
        _check_not_empty(source, len(records), "train", stats["splits"]["train"]["total"], config.fold)
    return write_stats(out_dir, stats)


def _new_records(extra: Iterable[Record], records: list[Record], stats: dict) -> Iterator[Record]:
    """The PQA-A records that are not PQA-L questions: none twice, and no dev/test leak."""
    known = {r.pmid for r in records}
    for rec in extra:
        if rec.pmid in known:
            stats["pqa_a_dropped_overlap"] += 1
        else:
            yield rec


def _check_not_empty(source: Path, n: int, split: str, size: int, fold: int) -> None:
    if not size:
        raise DataError(f"{source}: the official split of its {n} record(s) leaves split '{split}' of fold {fold} "
                        "empty; it needs enough records for 2 halves and 10 folds (the real ori_pqal.json has "
                        "1,000). Give the full file, or another data.pubmedqa.fold")


def _columns(name: str, rows: list[Record], config: PubMedQAConfig, tokenizer: Any) -> dict[str, list]:
    budget = config.max_prompt_tokens if name in BUDGETED_SPLITS else None
    prompts, truncated = _prompts(rows, config.template, tokenizer, budget)
    return {
        "id": [r.pmid for r in rows], "split": [name] * len(rows), "prompt": prompts,
        "answer": [r.label for r in rows], "choices": [list(LABELS)] * len(rows),
        "question": [r.question for r in rows], "contexts": [r.contexts for r in rows],
        "truncated": truncated, "source": [r.source for r in rows],
    }


def _write_split(out_dir: Path, name: str, rows: list[Record], config: PubMedQAConfig, tokenizer: Any) -> dict:
    columns = _columns(name, rows, config, tokenizer)
    write_parquet(out_dir / f"{name}.parquet", columns, PUBMEDQA_SCHEMA)
    return _split_stats(Counter(columns["answer"]), sum(columns["truncated"]), Counter(columns["source"]))


def _write_chunked(out_dir: Path, name: str, rows: Iterable[Record], config: PubMedQAConfig, tokenizer: Any) -> dict:
    """Like _write_split, CHUNK_ROWS rows at a time (one row group each)."""
    labels, sources, truncated = Counter(), Counter(), 0
    rows = iter(rows)
    with ParquetSink(out_dir / f"{name}.parquet", PUBMEDQA_SCHEMA) as sink:
        while chunk := list(itertools.islice(rows, CHUNK_ROWS)):
            columns = _columns(name, chunk, config, tokenizer)
            sink.write(columns)
            labels.update(columns["answer"])
            sources.update(columns["source"])
            truncated += sum(columns["truncated"])
    return _split_stats(labels, truncated, sources)


def _split_stats(labels: Counter, truncated: int, sources: Counter) -> dict:
    return {"total": sum(labels.values()), **{lab: labels[lab] for lab in LABELS},
            "truncated": truncated, "sources": dict(sources)}
