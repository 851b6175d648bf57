"""The bad-input catalogue, through the command line: a clear error naming the file, field or
record; exit code 2; nothing written and nothing cached.

Library-level checks of the same inputs live beside their modules (test_pubmedqa, test_mmlu,
test_models, test_quantize, test_train_*); this file makes sure each one also reaches the user
as one paragraph with a non-zero exit, and that a failed stage leaves no artifact behind.
"""

from __future__ import annotations

import json
import shutil
import tracemalloc
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from expert.artifacts import MANIFEST, ArtifactStore
from expert.cli import main
from expert.errors import DataError
from tests.fixtures.data import (
    mmlu_rows,
    pubmedqa_record,
    pubmedqa_records,
    write_mmlu_dir,
    write_mmlu_hf,
    write_pubmedqa_hf,
    write_pubmedqa_json,
)


@pytest.fixture(autouse=True)
def artifacts_root(tmp_path, monkeypatch):
    monkeypatch.setenv("EXPERT_ARTIFACTS", str(tmp_path / "artifacts"))
    return tmp_path / "artifacts"


def fails_cleanly(argv: list[str], out: Path, capsys, *expected: str) -> str:
    """Run the CLI; it must exit 2 with one paragraph holding every `expected` text, write no
    output folder and leave no complete artifact anywhere."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("expert: error:") and "Traceback" not in err, err
    for text in expected:
        assert text in err, f"{text!r} not in {err!r}"
    assert not out.exists()
    assert not list(out.parent.rglob(MANIFEST))
    return err


# ---------------------------------------------------------------- PubMedQA

def record_without(field):
    rec = pubmedqa_record(7, "yes")
    del rec[field]
    return rec


PUBMEDQA_CASES = {
    "malformed-json": ('{"1": {"QUESTION": "q?", ', ["is not valid JSON"]),
    "empty-file": ("", ["is empty"]),
    "empty-object": ("{}", ["non-empty JSON object"]),
    "not-an-object": ("[1, 2]", ["non-empty JSON object keyed by PMID"]),
    "no-QUESTION": ({"7": record_without("QUESTION")}, ["record PMID 7", "'QUESTION'"]),
    "no-CONTEXTS": ({"7": record_without("CONTEXTS")}, ["record PMID 7", "'CONTEXTS'"]),
    "no-final_decision": ({"7": record_without("final_decision")}, ["record PMID 7", "'final_decision'"]),
    "label-outside-yes-no-maybe": ({"7": {**pubmedqa_record(7, "yes"), "final_decision": "probably"}},
                                   ["record PMID 7", "'final_decision' must be one of yes, no, maybe", "'probably'"]),
    "split-ends-up-empty": (pubmedqa_records(3), ["leaves split", "empty"]),
}


@pytest.mark.parametrize("content, expected", PUBMEDQA_CASES.values(), ids=PUBMEDQA_CASES)
def test_bad_pubmedqa_json(tmp_path, capsys, content, expected):
    path = tmp_path / "ori_pqal.json"
    if isinstance(content, str):
        path.write_text(content)
    elif len(content) == 1:  # one bad record among good ones
        path.write_text(json.dumps({**pubmedqa_records(40), **content}))
    else:
        path.write_text(json.dumps(content))
    out = tmp_path / "out"
    fails_cleanly(["format", "pubmedqa", "--source", str(path), "--out", str(out), "--fold", "5"],
                  out, capsys, str(path), *expected)


def test_bad_pubmedqa_extra_train_file_names_it(tmp_path, capsys):
    good = write_pubmedqa_json(tmp_path / "ori_pqal.json", n=60)
    extra = tmp_path / "ori_pqaa.json"
    extra.write_text(json.dumps({**pubmedqa_records(5, first_pmid=2 * 10**7), "999": record_without("CONTEXTS")}))
    out = tmp_path / "out"
    fails_cleanly(["format", "pubmedqa", "--source", str(good), "--extra-train", str(extra), "--out", str(out)],
                  out, capsys, str(extra), "record PMID 999", "'CONTEXTS'")


def test_malformed_pubmedqa_parquet(tmp_path, capsys):
    root = write_pubmedqa_hf(tmp_path / "hf", pubmedqa_records(40))
    parquet = next((root / "pqa_labeled").glob("*.parquet"))
    parquet.write_bytes(parquet.read_bytes()[:100])  # truncated download
    out = tmp_path / "out"
    fails_cleanly(["format", "pubmedqa", "--source", str(root), "--out", str(out)],
                  out, capsys, str(parquet), "not a readable Parquet file")


# ---------------------------------------------------------------- MMLU

def write_test_csv(root: Path, rows) -> Path:
    import csv

    path = root / "test" / "anatomy_test.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    return path


MMLU_CASES = {
    "wrong-column-count": (lambda r: r[1].pop(), ["row 2", "expected 6 columns", "got 5"]),
    "answer-outside-A-D": (lambda r: r[2].__setitem__(5, "F"), ["row 3", "'answer' must be one of A, B, C, D", "'F'"]),
    "empty-file": (lambda r: r.clear(), ["holds no questions"]),
}


@pytest.mark.parametrize("edit, expected", MMLU_CASES.values(), ids=MMLU_CASES)
def test_bad_mmlu_csv(tmp_path, capsys, edit, expected):
    root = write_mmlu_dir(tmp_path / "mmlu")
    rows = mmlu_rows("anatomy", "test", 4)
    edit(rows)
    path = write_test_csv(root, rows)
    out = tmp_path / "out"
    fails_cleanly(["format", "mmlu", "--source", str(root), "--out", str(out)], out, capsys, str(path), *expected)


def test_mmlu_csv_that_is_not_text(tmp_path, capsys):
    root = write_mmlu_dir(tmp_path / "mmlu")
    path = root / "test" / "anatomy_test.csv"
    path.write_bytes(b"\xff\xfe\x00binary\x00junk\n" * 3)
    out = tmp_path / "out"
    fails_cleanly(["format", "mmlu", "--source", str(root), "--out", str(out)], out, capsys,
                  str(path), "not readable CSV")


def test_malformed_and_bad_mmlu_parquet(tmp_path, capsys):
    root = write_mmlu_hf(tmp_path / "hf", subjects=("anatomy",))
    path = root / "anatomy" / "test-00000-of-00001.parquet"
    table = pq.read_table(path).to_pydict()
    table["answer"][0] = 7
    pq.write_table(pq.read_table(path).from_pydict(table), path)
    out = tmp_path / "out"
    fails_cleanly(["format", "mmlu", "--source", str(root), "--out", str(out)], out, capsys,
                  str(path), "row 1", "'answer' must be an index 0-3", "got 7")
    path.write_bytes(b"PAR1 this is not parquet PAR1")
    fails_cleanly(["format", "mmlu", "--source", str(root), "--out", str(out)], out, capsys,
                  str(path), "not a readable Parquet file")


def test_empty_mmlu_folder(tmp_path, capsys):
    (tmp_path / "mmlu").mkdir()
    out = tmp_path / "out"
    fails_cleanly(["format", "mmlu", "--source", str(tmp_path / "mmlu"), "--out", str(out)], out, capsys,
                  "holds no MMLU subjects")


# ---------------------------------------------------------------- models

@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from tests.fixtures.models import tiny_llama_dir

    return tiny_llama_dir(tmp_path_factory.mktemp("llama"))


def no_eos(llama_dir: Path, target: Path) -> Path:
    shutil.copytree(llama_dir, target)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = target / name
        if path.is_file():
            data = json.loads(path.read_text())
            data.pop("eos_token", None)
            path.write_text(json.dumps(data))
    return target


def test_bad_model_sources(llama_dir, tmp_path, capsys):
    from tests.fixtures.models import tiny_gguf

    out = tmp_path / "model-out"
    cases = [
        (str(tmp_path / "missing"), ["no such file or folder", "missing"]),
        (str((tmp_path / "empty").mkdir() or tmp_path / "empty"), ["not a Hugging Face model folder", "config.json"]),
        ("gguf:" + str(tiny_gguf(tmp_path / "alien.gguf", architecture="alienlm")),
         ["alien.gguf", "'alienlm'", "cannot load from GGUF"]),
        (str(no_eos(llama_dir, tmp_path / "no_eos")), ["no_eos", "has no eos_token", "tokenizer_config.json"]),
    ]
    for source, expected in cases:
        fails_cleanly(["import-model", "--source", source, "--out", str(out)], out, capsys, *expected)


# ---------------------------------------------------------------- configuration

CONFIG_CASES = {
    "unknown-key": ("train.learnig_rate=0.1", ["train.learnig_rate", "did you mean 'learning_rate'"]),
    "zero-learning-rate": ("train.learning_rate=0", ["train.learning_rate", "greater than 0"]),
    "negative-learning-rate": ("train.learning_rate=-1e-4", ["train.learning_rate"]),
    "zero-micro-batch": ("train.micro_batch_size=0", ["train.micro_batch_size"]),
    "negative-effective-batch": ("train.effective_batch_size=-50", ["train.effective_batch_size"]),
    "zero-epochs": ("train.epochs=0", ["train.epochs"]),
    "negative-epochs": ("train.epochs=-1", ["train.epochs"]),
    "zero-eval-batch": ("eval.batch_size=0", ["eval.batch_size"]),
    "bad-bits": ("quantize.bits=5", ["quantize.bits"]),
    "empty-target-modules": ("train.target_modules=[]", ["train.target_modules"]),
}


@pytest.mark.parametrize("override, expected", CONFIG_CASES.values(), ids=CONFIG_CASES)
def test_bad_config_values_fail_before_anything_runs(tmp_path, capsys, override, expected):
    fails_cleanly(["run", "configs/default.yaml", "--set", override], tmp_path / "never", capsys, *expected)


# ---------------------------------------------------------------- a failed stage caches nothing

def test_a_stage_that_fails_on_bad_input_leaves_no_artifact(tmp_path):
    from expert.pipeline_config import load_config
    from expert.stages import FormatPubMedQA
    from expert.workspace import Workspace

    bad = tmp_path / "ori_pqal.json"
    bad.write_text(json.dumps({**pubmedqa_records(40), "7": record_without("QUESTION")}))
    config = load_config(None, [f"data.pubmedqa.source={bad}"]).data.pubmedqa
    workspace = Workspace.at(tmp_path / "artifacts")
    stage = FormatPubMedQA()
    inputs = stage.fetch(config, workspace)
    request = stage.request(config, {}, inputs)
    with pytest.raises(DataError, match="record PMID 7"):
        workspace.store.build(request, lambda out: stage.produce(config, {}, inputs, out))
    assert workspace.store.get(request) is None
    assert not list((workspace.root / "format_pubmedqa").iterdir())  # no partial folder, no lock file
    bad.write_text(json.dumps(pubmedqa_records(40)))  # fixed: the next run builds it
    inputs = stage.fetch(config, workspace)
    request = stage.request(config, {}, inputs)
    assert ArtifactStore(workspace.root).build(request, lambda out: stage.produce(config, {}, inputs, out))


# ---------------------------------------------------------------- bigger than memory: streamed

def test_pubmedqa_extra_file_is_streamed_not_loaded(tmp_path, monkeypatch):
    """PQA-A is formatted in constant memory: never parsed whole (json.load/loads would fail
    here), read in small chunks, and written in row groups; Python's peak allocation stays a
    fraction of the file."""
    import json as json_module

    from expert.benchmarks import jsonstream, pubmedqa
    from expert.benchmarks.pubmedqa import PubMedQAConfig, format_pubmedqa

    pqal = write_pubmedqa_json(tmp_path / "ori_pqal.json", n=60)
    extra = pubmedqa_records(3000, first_pmid=2 * 10**7)
    for i, rec in enumerate(extra.values()):
        rec["CONTEXTS"] = [f"Long section {s} of study {i}: " + "words of the abstract " * 20 for s in range(3)]
    pqaa = write_pubmedqa_json(tmp_path / "ori_pqaa.json", records=extra)
    del extra

    def no_whole_file(*args, **kwargs):
        raise AssertionError("the whole file was parsed at once")

    monkeypatch.setattr(json_module, "load", no_whole_file)
    monkeypatch.setattr(json_module, "loads", no_whole_file)
    monkeypatch.setattr(jsonstream, "CHUNK_CHARS", 4096)  # many chunk boundaries inside records
    monkeypatch.setattr(pubmedqa, "CHUNK_ROWS", 100)
    # Once on a small file first: lazy imports inside pyarrow would count as allocations.
    small = write_pubmedqa_json(tmp_path / "small.json", records=pubmedqa_records(3, first_pmid=3 * 10**7))
    format_pubmedqa(PubMedQAConfig(extra_train_source="x"), pqal, tmp_path / "warm", extra_source=small)
    tracemalloc.start()
    try:
        stats = format_pubmedqa(PubMedQAConfig(extra_train_source="x"), pqal, tmp_path / "out", extra_source=pqaa)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    train = stats["splits"]["train"]
    assert train["sources"]["pqa_a"] == 3000
    assert pq.ParquetFile(tmp_path / "out" / "train.parquet").num_row_groups == -(-train["total"] // 100)
    assert peak < pqaa.stat().st_size / 4, (peak, pqaa.stat().st_size)
