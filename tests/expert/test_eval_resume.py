"""Resumable MMLU scoring (expert/evaluation/resume.py): a crash loses at most the subject being scored."""

from __future__ import annotations

import json
import logging

import pandas as pd
import pytest

from expert.evaluation import EvalConfig, evaluate
from expert.evaluation import resume, runner
from tests.expert.eval_fixtures import MMLU_SUBJECTS, llama_dir, mmlu_dir, pubmedqa_dir  # noqa: F401

CONFIG = EvalConfig(device="cpu", dtype="float32", batch_size=2)


class Crash(Exception):
    pass


def crash_after_writes(monkeypatch, n: int, key: str) -> list:
    """From here on resume.write_kept writes each record, then raises Crash after the n-th: a kill
    right after that record was kept. Returns the record[key] of each record written."""
    real_write, written = resume.write_kept, []

    def write_then_crash(path, record):
        real_write(path, record)
        written.append(record[key])
        if len(written) == n:
            raise Crash(f"killed right after record {n} was kept")

    monkeypatch.setattr(resume, "write_kept", write_then_crash)
    return written


def scored_subjects(monkeypatch) -> list[list[str]]:
    """The subjects of every score_frame call from here on."""
    calls: list[list[str]] = []
    real = runner.score_frame

    def spy(model, tokenizer, frame, *args, **kwargs):
        calls.append(sorted(frame["subject"].unique()))
        return real(model, tokenizer, frame, *args, **kwargs)

    monkeypatch.setattr(runner, "score_frame", spy)
    return calls


def outputs(out):
    table = pd.read_parquet(out / "predictions.parquet")
    metrics = json.loads((out / "metrics.json").read_text())
    return table, {k: v for k, v in metrics.items() if k != "timing"}, metrics["timing"]


@pytest.fixture
def reference(llama_dir, mmlu_dir, tmp_path):
    """An uninterrupted evaluation without a work folder."""
    evaluate(CONFIG, "mmlu", llama_dir, mmlu_dir, tmp_path / "reference")
    return outputs(tmp_path / "reference")


def test_a_rerun_after_a_crash_scores_only_the_missing_subjects_and_ends_as_an_uninterrupted_run(
        llama_dir, mmlu_dir, tmp_path, monkeypatch, reference):
    work = tmp_path / "work"
    written = crash_after_writes(monkeypatch, 1, "subject")
    with pytest.raises(Crash):
        evaluate(CONFIG, "mmlu", llama_dir, mmlu_dir, tmp_path / "first", work_dir=work)
    assert len(written) == 1 and len(list((work / resume.FOLDER).glob("*.json"))) == 1
    monkeypatch.undo()

    calls = scored_subjects(monkeypatch)
    evaluate(CONFIG, "mmlu", llama_dir, mmlu_dir, tmp_path / "second", work_dir=work)
    assert calls == [sorted(set(MMLU_SUBJECTS) - set(written))]  # the kept subject was not scored again
    table, metrics, timing = outputs(tmp_path / "second")
    want_table, want_metrics, _ = reference
    pd.testing.assert_frame_equal(table, want_table)  # log-likelihoods to the last bit
    assert metrics == want_metrics  # scoring mode included: one-pass questions of the kept subject count
    assert timing["resumed_questions"] == len(table[table["subject"] == written[0]])


def test_with_every_subject_kept_nothing_is_scored(llama_dir, mmlu_dir, tmp_path, monkeypatch, reference):
    work = tmp_path / "work"
    evaluate(CONFIG, "mmlu", llama_dir, mmlu_dir, tmp_path / "first", work_dir=work)
    assert len(list((work / resume.FOLDER).glob("*.json"))) == len(MMLU_SUBJECTS)
    calls = scored_subjects(monkeypatch)
    evaluate(CONFIG, "mmlu", llama_dir, mmlu_dir, tmp_path / "second", work_dir=work)
    assert calls == []
    table, metrics, timing = outputs(tmp_path / "second")
    pd.testing.assert_frame_equal(table, reference[0])
    assert metrics == reference[1]
    assert timing["resumed_questions"] == len(table)


@pytest.mark.parametrize("spoil, says", [
    (lambda record: {**record, "dtype": "bfloat16"}, "scored with dtype 'bfloat16', this run has 'float32'"),
    # 'auto' took another GPTQ kernel on the machine of the first attempt (the fixture's model has none)
    (lambda record: {**record, "gptq_kernel": "MarlinLinear"},
     "scored with gptq_kernel 'MarlinLinear', this run has None"),
    (lambda record: {**record, "ids": record["ids"][:-1]}, "question ids are not the ones"),
    (lambda record: {**record, "scores": record["scores"][:-1]}, "not one list of numbers per question"),
    (lambda record: "{torn", "unreadable"),
])
def test_a_kept_subject_that_does_not_fit_is_scored_again(llama_dir, mmlu_dir, tmp_path, monkeypatch, caplog,
                                                          reference, spoil, says):
    work = tmp_path / "work"
    evaluate(CONFIG, "mmlu", llama_dir, mmlu_dir, tmp_path / "first", work_dir=work)
    subject = sorted(MMLU_SUBJECTS)[0]
    path = work / resume.FOLDER / resume.file_name(subject)
    spoiled = spoil(json.loads(path.read_text()))
    path.write_text(spoiled if isinstance(spoiled, str) else json.dumps(spoiled))
    calls = scored_subjects(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="expert.evaluation.resume"):
        evaluate(CONFIG, "mmlu", llama_dir, mmlu_dir, tmp_path / "second", work_dir=work)
    assert calls == [[subject]]
    assert says in caplog.text and subject in caplog.text
    pd.testing.assert_frame_equal(outputs(tmp_path / "second")[0], reference[0])


def test_pubmedqa_and_mmlu_without_prefix_caching_are_scored_whole(llama_dir, mmlu_dir, pubmedqa_dir, tmp_path):
    evaluate(CONFIG, "pubmedqa", llama_dir, pubmedqa_dir, tmp_path / "pqa", work_dir=tmp_path / "w1")
    evaluate(CONFIG.model_copy(update={"prefix_cache": False}), "mmlu", llama_dir, mmlu_dir, tmp_path / "mmlu",
             work_dir=tmp_path / "w2")
    assert not (tmp_path / "w1").exists() and not (tmp_path / "w2").exists()


def test_resumable_needs_prefix_groups_within_one_subject():
    frame = pd.DataFrame({"subject": ["a", "a", "b"], "prefix": ["p", "p", "q"]})
    assert resume.resumable("mmlu", True, frame)
    assert resume.resumable("mmlu", True, frame.drop(columns="prefix"))
    assert not resume.resumable("mmlu", True, frame.assign(prefix=["p", "p", "p"]))  # one group, two subjects
    assert not resume.resumable("mmlu", False, frame)
    assert not resume.resumable("pubmedqa", True, frame)


def test_every_subject_gets_a_file_name_of_its_own():
    names = ["abstract_algebra", "a/b", "a_b", "../x", "é" * 200]
    files = [resume.file_name(n) for n in names]
    assert len(set(files)) == len(names)
    assert all("/" not in f and not f.startswith(".") and len(f) < 120 for f in files)


def test_the_evaluate_stage_gives_its_work_folder(monkeypatch, tmp_path):
    import expert.evaluation as evaluation
    from expert.stages.evaluation import Evaluate

    seen = {}
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: seen.update(k) or {})
    Evaluate(benchmark="mmlu").produce(CONFIG, {"model": tmp_path, "data": tmp_path}, {}, tmp_path / "out",
                                       work_dir=tmp_path / "work")
    assert seen["work_dir"] == tmp_path / "work"
