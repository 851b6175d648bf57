"""PubMedQA (PQA-L, 1,000 expert-labelled questions) formatted into Parquet.

Reads the authors' `ori_pqal.json` or a folder holding the Hugging Face `qiaojin/PubMedQA`
`pqa_labeled` parquet, rebuilds the official split (500 test, 500 cross-validation pool cut
into 10 folds of 50; dev = fold k, train = the other nine) and writes `train.parquet`,
`dev.parquet`, `test.parquet` and `stats.json`. Prompts use the reasoning-required setting:
question and abstract, never the long answer (which holds the conclusion).

    format_pubmedqa(PubMedQAConfig(fold=0), Path("ori_pqal.json"), Path("out"))
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow.parquet as pq
from pydantic import Field, field_validator

from expert.benchmarks.schema import PUBMEDQA_SCHEMA, write_parquet, write_stats
from expert.config import StageConfig
from expert.errors import ConfigError, DataError

LABELS = ("yes", "no", "maybe")  # also the order in which the authors shuffle the labels
SPLITS = ("train", "dev", "test")
NUM_FOLDS = 10
SPLIT_SEED = 0  # the authors' random.seed(0)

# Named prompt templates; {contexts} is the abstract's sections joined by newlines.
TEMPLATES = {
    # lm-evaluation-harness's pubmedqa doc_to_text.
    "lm-eval": "Abstract: {contexts}\nQuestion: {question}\nAnswer:",
}

# Field names of the two layouts, so that errors name the field as the user's file spells it.
_JSON_FIELDS = {"question": "QUESTION", "contexts": "CONTEXTS", "label": "final_decision"}
_HF_FIELDS = {"question": "question", "contexts": "context.contexts", "label": "final_decision"}
_HF_SUBDIRS = {"pqa_l": "pqa_labeled", "pqa_a": "pqa_artificial"}


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
        None, gt=0, description="token budget for prompt + answer + EOS; cuts the abstract; needs a tokenizer"
    )

    @field_validator("template")
    @classmethod
    def _known_template(cls, value: str) -> str:
        if value not in TEMPLATES:
            raise ValueError(f"unknown template {value!r}; choose one of: {', '.join(sorted(TEMPLATES))}")
        return value


class Record(NamedTuple):
    pmid: str
    question: str
    contexts: list[str]
    label: str
    source: str  # "pqa_l" or "pqa_a"


# ---------------------------------------------------------------- reading

def load_records(path: Path, source: str = "pqa_l") -> list[Record]:
    """Validated records of an ori_*.json file or an HF parquet folder, in stored order
    (the order matters: the official split depends on it)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"PubMedQA source {path} does not exist; give ori_pqal.json "
                        f"or a folder with {_HF_SUBDIRS[source]}/*.parquet")
    if path.is_dir() or path.suffix == ".parquet":
        return _records_from_parquet(path, source)
    return [_check(path, pmid, rec, _JSON_FIELDS, source) for pmid, rec in _read_json(path).items()]


def _read_json(path: Path) -> dict[str, Any]:
    text = path.read_bytes()
    if not text.strip():
        raise DataError(f"{path} is empty; re-download ori_pqal.json (a JSON object keyed by PMID)")
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise DataError(f"{path} is not valid JSON ({exc}); re-download it") from None
    if not isinstance(data, dict) or not data:
        raise DataError(f"{path} must be a non-empty JSON object keyed by PMID, like the authors' ori_pqal.json")
    return data


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads would silently keep the last of two records with the same PMID.
    out = dict(pairs)
    if len(out) != len(pairs):
        dup = next(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
        raise ValueError(f"key {dup!r} appears twice")
    return out


def _records_from_parquet(path: Path, source: str) -> list[Record]:
    subdir = _HF_SUBDIRS[source]
    files = [path] if path.is_file() else sorted(path.glob(f"{subdir}/*.parquet")) or sorted(path.glob("*.parquet"))
    if not files:
        raise DataError(f"{path} holds no {subdir}/*.parquet; give the qiaojin/PubMedQA snapshot folder or ori_pqal.json")
    records, seen = [], set()
    for file in files:
        table = pq.read_table(file)
        missing = {"pubid", "question", "context", "final_decision"} - set(table.column_names)
        if missing:
            raise DataError(f"{file} lacks column(s) {sorted(missing)}; expected the qiaojin/PubMedQA {subdir} layout")
        contexts = table.column("context").combine_chunks().field("contexts").to_pylist()
        rows = zip(table.column("pubid").to_pylist(), table.column("question").to_pylist(), contexts,
                   table.column("final_decision").to_pylist())
        for pubid, question, ctx, label in rows:
            fields = {"question": question, "context.contexts": ctx, "final_decision": label}
            rec = _check(file, str(pubid), fields, _HF_FIELDS, source)
            if rec.pmid in seen:
                raise DataError(f"{file}: PMID {rec.pmid} appears twice; remove the duplicate")
            seen.add(rec.pmid)
            records.append(rec)
    return records


def _check(path: Path, pmid: str, rec: Any, names: dict[str, str], source: str) -> Record:
    """One record, validated; the error names the file, the PMID and the field."""
    where = f"{path}: record PMID {pmid}"
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected an object with {', '.join(names.values())}, got {type(rec).__name__}")
    question, contexts, label = (rec.get(names[k]) for k in ("question", "contexts", "label"))
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: field '{names['question']}' must be a non-empty string, got {question!r}")
    if not isinstance(contexts, list) or not contexts or not all(isinstance(c, str) for c in contexts):
        raise DataError(
            f"{where}: field '{names['contexts']}' must be a non-empty list of strings, got {_short(contexts)}")
    if label not in LABELS:
        raise DataError(f"{where}: field '{names['label']}' must be one of {', '.join(LABELS)}, got {label!r}")
    return Record(pmid, question, contexts, label, source)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 80 else text[:77] + "..."


# ---------------------------------------------------------------- the official split

def official_split(records: list[Record], fold: int) -> dict[str, list[Record]]:
    """The split of the authors' preprocess/split_dataset.py: one random stream seeded 0,
    first split into 2 halves (CV pool, test), then the CV pool into 10 folds."""
    rng = random.Random(SPLIT_SEED)
    cv_pool, test = _stratified_split(records, 2, rng)
    folds = _stratified_split(cv_pool, NUM_FOLDS, rng)
    train = [r for k, part in enumerate(folds) if k != fold for r in part]
    return {"train": train, "dev": folds[fold], "test": test}


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
    dropped = 0
    if extra_source is not None:
        known = {r.pmid for r in records}
        extra = load_records(extra_source, "pqa_a")
        kept = [r for r in extra if r.pmid not in known]  # no PQA-L question twice, and no dev/test leak
        dropped = len(extra) - len(kept)
        splits["train"] += kept
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats: dict[str, Any] = {"benchmark": "pubmedqa", "fold": config.fold, "template": config.template,
                             "max_prompt_tokens": config.max_prompt_tokens, "pqa_a_dropped_overlap": dropped,
                             "splits": {}}
    for name in SPLITS:
        stats["splits"][name] = _write_split(out_dir, name, splits[name], config, tokenizer)
    return write_stats(out_dir, stats)


def _write_split(out_dir: Path, name: str, rows: list[Record], config: PubMedQAConfig, tokenizer: Any) -> dict:
    prompts, truncated = _prompts(rows, config.template, tokenizer, config.max_prompt_tokens)
    columns = {
        "id": [r.pmid for r in rows], "split": [name] * len(rows), "prompt": prompts,
        "answer": [r.label for r in rows], "choices": [list(LABELS)] * len(rows),
        "question": [r.question for r in rows], "contexts": [r.contexts for r in rows],
        "truncated": truncated, "source": [r.source for r in rows],
    }
    write_parquet(out_dir / f"{name}.parquet", columns, PUBMEDQA_SCHEMA)
    labels = Counter(r.label for r in rows)
    return {"total": len(rows), **{lab: labels[lab] for lab in LABELS},
            "truncated": sum(truncated), "sources": dict(Counter(r.source for r in rows))}
