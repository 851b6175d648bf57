"""PubMedQA formatting: the official split and its digest check, prompts, train-only truncation, both input
layouts, bad input."""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import time

import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from expert.benchmarks import pubmedqa
from expert.benchmarks.pubmedqa import (LABELS, PubMedQAConfig, check_official_test, format_pubmedqa, load_records,
                                        official_split, pmid_digest)
from expert.benchmarks.schema import PUBMEDQA_SCHEMA
from expert.errors import ConfigError, DataError
from tests.fixtures.data import (
    LONG_ANSWER_MARKER,
    pubmedqa_record,
    pubmedqa_records,
    write_pubmedqa_hf,
    write_pubmedqa_json,
)


def read(out, split):
    return pq.read_table(out / f"{split}.parquet").to_pydict()


# ---------------------------------------------------------------- the official split

def authors_split(dataset: dict, fold: int) -> tuple[list, list, list]:
    """A second, plain transcription of the authors' preprocess/split_dataset.py, on dicts
    as they do it: one random stream seeded 0; returns (train, dev, test) PMIDs in order."""
    rng = random.Random(0)

    def split(data: dict, parts: int) -> list[dict]:
        pmids_of = {"yes": [], "no": [], "maybe": []}
        for pmid, info in data.items():
            pmids_of[info["final_decision"]].append(pmid)
        pieces = {}
        for label, pmids in pmids_of.items():
            rng.shuffle(pmids)
            step = math.ceil(len(pmids) / parts)
            bounds = [i * step for i in range(parts)] + [len(pmids)]
            pieces[label] = [pmids[bounds[i]:bounds[i + 1]] for i in range(parts)]
        out = [{p: data[p] for label in pmids_of for p in pieces[label][i]} for i in range(parts)]
        if len(out[-1]) != len(out[0]):
            for i in range(parts - 1):
                picked = rng.choice(list(out[i]))
                out[-1][picked] = out[i].pop(picked)
        return out

    cv_pool, test = split(dataset, 2)
    folds = split(cv_pool, 10)
    train = [p for k in range(10) if k != fold for p in folds[k]]
    return train, list(folds[fold]), list(test)


def synthetic_dataset(counts: tuple[int, int, int], seed: int = 7) -> dict:
    """Records with the given yes/no/maybe counts, labels and PMIDs in random stored order."""
    rng = random.Random(seed)
    labels = [lab for lab, n in zip(LABELS, counts) for _ in range(n)]
    rng.shuffle(labels)
    pmids = rng.sample(range(10_000_000, 40_000_000), len(labels))
    return {str(p): pubmedqa_record(i, lab) for i, (p, lab) in enumerate(zip(pmids, labels))}


@pytest.mark.parametrize("counts", [(552, 338, 110), (551, 337, 111)])  # PQA-L's counts; odd ones rebalance halves too
@pytest.mark.parametrize("fold", [0, 3, 9])
def test_split_matches_the_authors_procedure(tmp_path, counts, fold):
    dataset = synthetic_dataset(counts)
    source = write_pubmedqa_json(tmp_path / "ori_pqal.json", records=dataset)
    format_pubmedqa(PubMedQAConfig(fold=fold), source, tmp_path / "out")
    got = tuple(read(tmp_path / "out", s)["id"] for s in ("train", "dev", "test"))
    assert got == authors_split(dataset, fold)


def test_folds_partition_the_cv_pool(tmp_path):
    dataset = synthetic_dataset((552, 338, 110))
    records = load_records(write_pubmedqa_json(tmp_path / "ori_pqal.json", records=dataset))
    devs = []
    for fold in range(10):
        split = {k: [r.pmid for r in v] for k, v in official_split(records, fold).items()}
        assert [len(split[s]) for s in ("train", "dev", "test")] == [450, 50, 500]
        train, dev, test = (set(split[s]) for s in ("train", "dev", "test"))
        assert not train & dev and not test & (train | dev)
        assert set(split["train"]) | set(split["dev"]) | set(split["test"]) == set(dataset)
        devs.append(set(split["dev"]))
    assert set().union(*devs) == set(dataset) - set(split["test"]) and sum(map(len, devs)) == 500
    test_labels = [dataset[p]["final_decision"] for p in split["test"]]
    assert [test_labels.count(lab) for lab in LABELS] == [276, 169, 55]  # stratified: half of each label


def test_thousand_records_format_fast(tmp_path):
    source = write_pubmedqa_json(tmp_path / "ori_pqal.json", records=synthetic_dataset((552, 338, 110)))
    start = time.perf_counter()
    stats = format_pubmedqa(PubMedQAConfig(), source, tmp_path / "out")
    assert time.perf_counter() - start < 5  # ~0.3 s; the bound only catches a pathological slowdown
    assert stats["splits"]["test"]["total"] == 500


def test_tiny_input_still_splits(tmp_path):
    # The authors' code fails on empty folds; the 12-record fixture must still format.
    stats = format_pubmedqa(PubMedQAConfig(), write_pubmedqa_json(tmp_path / "p.json"), tmp_path / "out")
    assert sum(stats["splits"][s]["total"] for s in ("train", "dev", "test")) == 12


# ---------------------------------------------------------------- output

def test_rows_prompts_and_stats(tmp_path):
    records = pubmedqa_records(12)
    source = write_pubmedqa_json(tmp_path / "p.json", records=records)
    stats = format_pubmedqa(PubMedQAConfig(), source, tmp_path / "out")
    seen = []
    for split in ("train", "dev", "test"):
        assert pq.read_schema(tmp_path / "out" / f"{split}.parquet").equals(PUBMEDQA_SCHEMA)
        rows = pq.read_table(tmp_path / "out" / f"{split}.parquet").to_pylist()
        for row in rows:
            rec = records[row["id"]]
            abstract = "\n".join(rec["CONTEXTS"])
            assert row["prompt"] == f"Abstract: {abstract}\nQuestion: {rec['QUESTION']}\nAnswer:"
            assert LONG_ANSWER_MARKER not in row["prompt"]
            assert (row["answer"], row["split"]) == (rec["final_decision"], split)
            assert row["choices"] == ["yes", "no", "maybe"]
            assert (row["question"], row["contexts"], row["truncated"], row["source"]) == (
                rec["QUESTION"], rec["CONTEXTS"], False, "pqa_l")
        labels = [r["answer"] for r in rows]
        assert stats["splits"][split] == {"total": len(rows), **{lab: labels.count(lab) for lab in LABELS},
                                          "truncated": 0, "sources": {"pqa_l": len(rows)} if rows else {}}
        seen += [r["id"] for r in rows]
    assert sorted(seen) == sorted(records)
    assert json.loads((tmp_path / "out" / "stats.json").read_text()) == stats


def test_hf_parquet_layout_gives_the_same_files(tmp_path):
    records = synthetic_dataset((30, 20, 10))
    format_pubmedqa(PubMedQAConfig(), write_pubmedqa_json(tmp_path / "p.json", records=records), tmp_path / "a")
    format_pubmedqa(PubMedQAConfig(), write_pubmedqa_hf(tmp_path / "hf", records), tmp_path / "b")
    for split in ("train", "dev", "test"):
        assert read(tmp_path / "a", split) == read(tmp_path / "b", split)


@pytest.mark.parametrize("order, fails", [("as the authors store them", False), ("reversed", True)])
def test_a_full_pqa_l_in_another_order_is_refused(tmp_path, monkeypatch, order, fails):
    # The official split shuffles the records as stored: a copy (e.g. a hub parquet) that stores
    # the full PQA-L in another order would silently give another test split. A synthetic
    # 1,000-record set stands in for the real one: its digests take the shipped ones' place.
    records = synthetic_dataset((552, 338, 110))
    test = authors_split(records, 0)[2]
    monkeypatch.setattr(pubmedqa, "PQA_L_PMIDS_SHA256", pmid_digest(records))
    monkeypatch.setattr(pubmedqa, "OFFICIAL_TEST_PMIDS_SHA256", pmid_digest(test))
    stored = dict(reversed(records.items())) if order == "reversed" else records
    source = write_pubmedqa_hf(tmp_path / "hf", stored)
    if fails:
        with pytest.raises(DataError, match=r"holds the 1,000 PQA-L questions, but in an unexpected order.*"
                                            r"Use the authors' ori_pqal.json") as err:
            format_pubmedqa(PubMedQAConfig(), source, tmp_path / "out")
        assert str(source) in str(err.value)
    else:
        format_pubmedqa(PubMedQAConfig(), source, tmp_path / "out")
        assert read(tmp_path / "out", "test")["id"] == test


def test_official_test_check_compares_digests_of_the_full_pqa_l_only():
    pmids, test = ["3", "1", "2", "4"], ["4", "1"]
    full, official = pmid_digest(pmids), pmid_digest(["1", "4"])
    assert pmid_digest(["1", "4"]) == pmid_digest(["4", "1"])  # a set's digest: order does not count
    check_official_test("src", pmids, test, full, official)
    with pytest.raises(DataError, match="src holds the 1,000 PQA-L questions, but in an unexpected order"):
        check_official_test("src", pmids, ["2", "1"], full, official)
    check_official_test("src", pmids[:3], ["2", "1"], full, official)  # not the full PQA-L: nothing to check


def test_shipped_digests_have_the_form_pmid_digest_writes():
    # sha256 of "\n".join(sorted PMIDs): 64 lowercase hex digits. That they are the real PQA-L's and
    # the official test set's can only be checked on those files, which tests do not read; checked
    # by hand on 2026-11-28 (pmid_digest of ori_pqal.json and test_ground_truth.json: both equal).
    for digest in (pubmedqa.PQA_L_PMIDS_SHA256, pubmedqa.OFFICIAL_TEST_PMIDS_SHA256):
        assert re.fullmatch(r"[0-9a-f]{64}", digest), digest
    assert pmid_digest(["2", "10"]) == hashlib.sha256(b"10\n2").hexdigest()


def test_extra_pqa_a_records_join_train_only(tmp_path):
    records = pubmedqa_records(12)
    extra = pubmedqa_records(5, labels=("yes", "no"), first_pmid=20_000_000)
    extra["10000003"] = pubmedqa_record(99, "no")  # also in PQA-L: dropped, so it cannot leak into dev/test
    config = PubMedQAConfig(extra_train_source="ori_pqaa.json")
    stats = format_pubmedqa(config, write_pubmedqa_json(tmp_path / "l.json", records=records), tmp_path / "out",
                            extra_source=write_pubmedqa_json(tmp_path / "a.json", records=extra))
    train = read(tmp_path / "out", "train")
    assert [i for i, s in zip(train["id"], train["source"]) if s == "pqa_a"] == [str(20_000_000 + i) for i in range(5)]
    assert stats["pqa_a_dropped_overlap"] == 1 and stats["splits"]["train"]["sources"]["pqa_a"] == 5
    assert all(s == "pqa_l" for split in ("dev", "test") for s in read(tmp_path / "out", split)["source"])


# ---------------------------------------------------------------- truncation

def tiny_tokenizer(kind: str, texts: list[str]) -> PreTrainedTokenizerFast:
    if kind == "wordlevel":
        tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.WordLevelTrainer(special_tokens=["[UNK]", "<s>", "</s>"])
    else:  # byte-level BPE that also prepends BOS, like Llama's: the BOS counts against the budget
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["[UNK]", "<s>", "</s>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    if kind == "bpe+bos":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")


def long_abstract_records(every: int = 3) -> tuple[dict, set]:
    records = pubmedqa_records(12)
    long_ids = set(list(records)[::every])
    for pmid in long_ids:
        records[pmid]["CONTEXTS"] = [f"Long section {s} reports {s * 7} events among the patients." for s in range(40)]
    return records, long_ids


def budget_tokenizer(kind: str, records: dict) -> PreTrainedTokenizerFast:
    texts = [" ".join(r["CONTEXTS"]) + " " + r["QUESTION"] for r in records.values()]
    return tiny_tokenizer(kind, texts + ["Abstract: Question: Answer: yes no maybe"])


@pytest.mark.parametrize("kind", ["wordlevel", "bpe+bos"])
def test_truncation_cuts_only_the_abstract_of_train_prompts(tmp_path, kind):
    records, long_ids = long_abstract_records()
    tokenizer = budget_tokenizer(kind, records)
    source = write_pubmedqa_json(tmp_path / "p.json", records=records)
    stats = format_pubmedqa(PubMedQAConfig(max_prompt_tokens=90), source, tmp_path / "out", tokenizer)
    answer = max(len(tokenizer(" " + c, add_special_tokens=False)["input_ids"]) for c in LABELS)
    train = pq.read_table(tmp_path / "out" / "train.parquet").to_pylist()
    truncated = set()
    for row in train:
        rec = records[row["id"]]
        assert len(tokenizer(row["prompt"])["input_ids"]) + answer + 1 <= 90
        assert row["prompt"].endswith(f"\nQuestion: {rec['QUESTION']}\nAnswer:")
        abstract = row["prompt"][len("Abstract: "):-len(f"\nQuestion: {rec['QUESTION']}\nAnswer:")]
        assert "\n".join(rec["CONTEXTS"]).startswith(abstract) and len(abstract) > 20
        assert row["contexts"] == rec["CONTEXTS"]  # the column keeps the full abstract
        if row["truncated"]:
            truncated.add(row["id"])
    assert truncated == long_ids & {r["id"] for r in train} and truncated  # the fixture puts some in train
    assert stats["splits"]["train"]["truncated"] == len(truncated)
    assert stats["max_prompt_tokens"] == 90 and stats["max_prompt_tokens_splits"] == ["train"]


def test_dev_and_test_prompts_keep_the_full_abstract_under_a_budget(tmp_path):
    # The budget bounds training memory; the published results that test is ranked against
    # (and lm-eval) score the whole abstract, so dev and test must not lose its end.
    records, long_ids = long_abstract_records(every=2)
    tokenizer = budget_tokenizer("wordlevel", records)
    source = write_pubmedqa_json(tmp_path / "p.json", records=records)
    stats = format_pubmedqa(PubMedQAConfig(max_prompt_tokens=90), source, tmp_path / "out", tokenizer)
    held_out = read(tmp_path / "out", "dev")["id"] + read(tmp_path / "out", "test")["id"]
    assert long_ids & set(held_out)  # the fixture puts long abstracts where a cut would show
    for split in ("dev", "test"):
        for row in pq.read_table(tmp_path / "out" / f"{split}.parquet").to_pylist():
            rec = records[row["id"]]
            full = "Abstract: " + "\n".join(rec["CONTEXTS"]) + f"\nQuestion: {rec['QUESTION']}\nAnswer:"
            assert (row["prompt"], row["truncated"]) == (full, False)
        assert stats["splits"][split]["truncated"] == 0
    assert max(len(tokenizer(p)["input_ids"]) for p in read(tmp_path / "out", "test")["prompt"]) > 90


def test_full_abstract_dev_prompts_still_encode_within_train_max_length(tmp_path):
    # Training's dev loss reads dev.parquet: a dev prompt now longer than train.max_length is
    # cut on the left (the question and answer survive), counted, and never an error.
    from expert.train.data import IGNORE, encode_split, read_split

    records, long_ids = long_abstract_records(every=2)
    tokenizer = budget_tokenizer("wordlevel", records)
    source = write_pubmedqa_json(tmp_path / "p.json", records=records)
    format_pubmedqa(PubMedQAConfig(max_prompt_tokens=90), source, tmp_path / "out", tokenizer)
    rows = read_split(tmp_path / "out" / "test.parquet")  # the larger held-out split: more long rows
    split = encode_split(tokenizer, rows, max_length=90)
    assert split.truncated == len(long_ids & set(rows["id"])) > 0
    for example, answer in zip(split.examples, rows["answer"]):
        assert len(example.input_ids) <= 90
        labelled = [t for t in example.labels if t != IGNORE]
        assert labelled == tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def test_budget_too_small_for_the_question_is_a_config_error(tmp_path):
    records = pubmedqa_records(3)
    tokenizer = tiny_tokenizer("wordlevel", [" ".join(r["CONTEXTS"]) + " " + r["QUESTION"] for r in records.values()])
    with pytest.raises(ConfigError, match="max_prompt_tokens=5 leaves no room.*PMID"):
        format_pubmedqa(PubMedQAConfig(max_prompt_tokens=5), write_pubmedqa_json(tmp_path / "p.json", records=records),
                        tmp_path / "out", tokenizer)


@pytest.mark.parametrize("tokenizer, message", [(None, "no tokenizer was given"), (object(), "needs a fast tokenizer")])
def test_budget_needs_a_fast_tokenizer(tmp_path, tokenizer, message):
    source = write_pubmedqa_json(tmp_path / "p.json")
    with pytest.raises(ConfigError, match=f"max_prompt_tokens.*{message}"):
        format_pubmedqa(PubMedQAConfig(max_prompt_tokens=512), source, tmp_path / "out", tokenizer)


# ---------------------------------------------------------------- config and bad input

@pytest.mark.parametrize("data, message", [
    ({"template": "lm_eval"}, "unknown template 'lm_eval'; choose one of: lm-eval"),
    ({"fold": 10}, "'data.pubmedqa.fold'"),
    ({"max_prompt_tokens": 0}, "'data.pubmedqa.max_prompt_tokens'"),
    ({"folds": 1}, "did you mean 'fold'"),
])
def test_bad_config(data, message):
    with pytest.raises(ConfigError, match=message):
        PubMedQAConfig.from_dict(data, where="data.pubmedqa")


def bad_record(**changes):
    rec = pubmedqa_record(0, "yes")
    rec.update(changes)
    return {k: v for k, v in rec.items() if v is not None}


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ("{\"1\": ", "is not valid JSON"),
    ("[1, 2]", "must be a non-empty JSON object keyed by PMID"),
    ("{}", "must be a non-empty JSON object"),
    ('{"7": {"QUESTION": "q?"}, "7": {"QUESTION": "q?"}}', "not valid JSON .*'7' appears twice"),
    ({"7": bad_record(QUESTION=None)}, "record PMID 7: field 'QUESTION' must be a non-empty string"),
    ({"7": bad_record(QUESTION=" ")}, "record PMID 7: field 'QUESTION'"),
    ({"7": bad_record(CONTEXTS=None)}, "record PMID 7: field 'CONTEXTS' must be a non-empty list of strings"),
    ({"7": bad_record(CONTEXTS="one string")}, "record PMID 7: field 'CONTEXTS'"),
    ({"7": bad_record(CONTEXTS=["ok", 3])}, "record PMID 7: field 'CONTEXTS'"),
    ({"7": bad_record(final_decision=None)}, "record PMID 7: field 'final_decision' must be one of yes, no, maybe"),
    ({"7": bad_record(final_decision="Yes")}, "record PMID 7: field 'final_decision'.*got 'Yes'"),
    ({"7": ["not", "a", "record"]}, "record PMID 7: expected an object"),
])
def test_bad_json_names_file_record_and_field(tmp_path, content, message):
    path = tmp_path / "ori_pqal.json"
    path.write_text(content if isinstance(content, str) else json.dumps({**pubmedqa_records(2), **content}))
    with pytest.raises(DataError, match=message) as err:
        format_pubmedqa(PubMedQAConfig(), path, tmp_path / "out")
    assert str(path) in str(err.value)


def test_bad_hf_parquet(tmp_path):
    records = pubmedqa_records(3)
    records["10000001"]["final_decision"] = "perhaps"
    with pytest.raises(DataError, match="train-00000-of-00001.parquet: record PMID 10000001: field 'final_decision'"):
        load_records(write_pubmedqa_hf(tmp_path / "hf", records))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no pqa_labeled"):
        load_records(tmp_path / "empty")
    with pytest.raises(DataError, match="does not exist"):
        load_records(tmp_path / "missing.json")
