"""evaluate(): files written, ids, subsets, progress, report and plot, errors (non-finite scores too)."""

import json

import pandas as pd
import pytest
import torch

from expert.errors import ConfigError, DataError, ModelError
from expert.evaluation import EvalConfig, evaluate
from expert.evaluation import runner
from expert.evaluation.runner import load_model as runner_load_model, mmlu_num_shots
from tests.expert.eval_fixtures import llama_dir, mmlu_dir, pubmedqa_dir, pubmedqa_frame  # noqa: F401


def test_pubmedqa_outputs(llama_dir, pubmedqa_dir, tmp_path):
    calls = []
    out = tmp_path / "out"
    metrics = evaluate(EvalConfig(device="cpu"), "pubmedqa", llama_dir, pubmedqa_dir, out,
                       progress=lambda done, total: calls.append((done, total)), run_name="tiny")
    ids = pubmedqa_frame()["id"].tolist()
    preds = json.loads((out / "pubmedqa_preds.json").read_text())
    assert sorted(preds) == sorted(ids)  # exactly the evaluated ids, as the authors' script demands
    assert set(preds.values()) <= {"yes", "no", "maybe"}
    table = pd.read_parquet(out / "predictions.parquet")
    assert list(table.columns) == ["id", "gold", "prediction", "correct", "loglik_yes", "loglik_no", "loglik_maybe"]
    argmax = table[["loglik_yes", "loglik_no", "loglik_maybe"]].to_numpy().argmax(axis=1)
    assert [["yes", "no", "maybe"][i] for i in argmax] == table["prediction"].tolist()
    assert dict(zip(table["id"], table["prediction"])) == preds
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == metrics
    assert metrics["n"] == len(ids) and metrics["accuracy"] == pytest.approx(table["correct"].mean())
    assert metrics["scoring"]["one_pass_questions"] == len(ids)
    assert calls[-1] == (len(ids), len(ids))
    assert "**tiny**" in (out / "report.md").read_text()


def test_pubmedqa_dev_split(llama_dir, pubmedqa_dir, tmp_path):
    evaluate(EvalConfig(device="cpu", pubmedqa_split="dev"), "pubmedqa", llama_dir, pubmedqa_dir, tmp_path)
    assert len(json.loads((tmp_path / "pubmedqa_preds.json").read_text())) == 3


def test_mmlu_subset_outputs(llama_dir, mmlu_dir, tmp_path):
    config = EvalConfig(device="cpu", mmlu_subjects=["college_biology", "nutrition"], mmlu_max_per_subject=3,
                        batch_size=2)
    metrics = evaluate(config, "mmlu", llama_dir, mmlu_dir, tmp_path)
    assert metrics["n"] == 6 and set(metrics["subjects"]) == {"college_biology", "nutrition"}
    assert metrics["categories"].keys() == {"STEM", "other"}
    table = pd.read_parquet(tmp_path / "predictions.parquet")
    assert table["id"].tolist() == [f"{s}/{i}" for s in ("college_biology", "nutrition") for i in range(3)]
    assert metrics["average"] == pytest.approx(table["correct"].mean())
    png = (tmp_path / "mmlu.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    report = (tmp_path / "report.md").read_text()
    assert "![MMLU accuracy per subject](mmlu.png)" in report and "| college_biology | STEM |" in report
    # Parquet written without the formatter's stats.json: the shots are unknown, and the report says so
    assert metrics["num_shots"] is None and report.startswith("# MMLU (shot count not recorded): ")


def test_mmlu_shots_come_from_the_formatters_stats(llama_dir, mmlu_dir, tmp_path):
    (mmlu_dir / "stats.json").write_text(json.dumps({"benchmark": "mmlu", "num_shots": 1}))  # the fixture's 1 shot
    config = EvalConfig(device="cpu", mmlu_subjects=["nutrition"], mmlu_max_per_subject=2)
    metrics = evaluate(config, "mmlu", llama_dir, mmlu_dir, tmp_path, run_name="tiny")
    assert metrics["num_shots"] == 1 == json.loads((tmp_path / "metrics.json").read_text())["num_shots"]
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# MMLU (1-shot): tiny\n")
    assert "Not like-for-like: the published results are 5-shot and this run is 1-shot" in report
    assert "this run scored n=2 of MMLU's 14,042 test questions" in report  # a subset, too
    assert "| **tiny** (1-shot, n=2) |" in report and "| LLaMA-65B (5-shot, n=14,042) |" in report


@pytest.mark.parametrize("text, message", [
    ("[1]", "stats.json is not a JSON object"),
    ("{", "stats.json is not a JSON object"),
    ('{"num_shots": "5"}', "stats.json: field 'num_shots' must be a whole number >= 0, got '5'; re-run the data stage"),
])
def test_bad_mmlu_stats_are_named(tmp_path, text, message):
    (tmp_path / "stats.json").write_text(text)
    with pytest.raises(DataError, match=message):
        mmlu_num_shots(tmp_path)


def test_prefix_cache_changes_no_prediction_and_embeds_fewer_tokens(llama_dir, mmlu_dir, tmp_path, monkeypatch):
    # The cache must be used, not only harmless: count the tokens that reach the model's embedding.
    embedded = []

    def counting_load(*args, **kwargs):
        loaded = runner_load_model(*args, **kwargs)
        loaded.model.get_input_embeddings().register_forward_hook(
            lambda module, inputs, output: embedded.__setitem__(-1, embedded[-1] + inputs[0].numel()))
        return loaded

    monkeypatch.setattr(runner, "load_model", counting_load)
    results = {}
    for name, cached in (("a", True), ("b", False)):
        embedded.append(0)
        # In float32, where the same numbers computed two ways agree to 1e-4 ('auto' may be bf16 here).
        results[name] = evaluate(EvalConfig(device="cpu", dtype="float32", prefix_cache=cached), "mmlu", llama_dir,
                                 mmlu_dir, tmp_path / name)
    a = pd.read_parquet(tmp_path / "a" / "predictions.parquet")
    b = pd.read_parquet(tmp_path / "b" / "predictions.parquet")
    assert a["prediction"].tolist() == b["prediction"].tolist()
    assert a["loglik_A"].to_numpy() == pytest.approx(b["loglik_A"].to_numpy(), abs=1e-4)
    assert results["a"]["subjects"] == results["b"]["subjects"]
    assert results["a"]["scoring"]["prefix_cache"] and not results["b"]["scoring"]["prefix_cache"]
    # each subject's few-shot prefix goes through the model once instead of once per question
    assert 0 < embedded[0] < embedded[1], embedded


def test_unknown_subject_says_did_you_mean(llama_dir, mmlu_dir, tmp_path):
    with pytest.raises(ConfigError, match="'college_bio'.*did you mean 'college_biology'"):
        evaluate(EvalConfig(mmlu_subjects=["college_bio"]), "mmlu", llama_dir, mmlu_dir, tmp_path)


def test_unknown_benchmark_and_missing_data(llama_dir, tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'pubmedqa'"):
        evaluate(EvalConfig(), "pubmed", llama_dir, tmp_path, tmp_path / "out")
    with pytest.raises(DataError, match="test.parquet does not exist"):
        evaluate(EvalConfig(), "mmlu", llama_dir, tmp_path, tmp_path / "out")


def test_missing_column_is_named(llama_dir, tmp_path):
    pubmedqa_frame().drop(columns=["choices"]).to_parquet(tmp_path / "test.parquet")
    with pytest.raises(DataError, match="lacks column\\(s\\) choices"):
        evaluate(EvalConfig(), "pubmedqa", llama_dir, tmp_path, tmp_path / "out")


def test_config_rejects_typos_and_bad_values():
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        EvalConfig.from_dict({"batchsize": 4}, where="eval")
    with pytest.raises(ConfigError, match="pubmedqa_split"):
        EvalConfig.from_dict({"pubmedqa_split": "train"}, where="eval")


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_scores_in_bf16_where_the_cpu_multiplies_it(llama_dir, pubmedqa_dir, tmp_path, monkeypatch, native):
    """eval.dtype 'auto' on a CPU: bfloat16 where bf16 matmuls are native (2.6x float32's speed
    measured), float32 where torch would emulate them; a dtype by name is taken as it is."""
    from expert import modeling
    from expert.evaluation.loading import scoring_dtype

    monkeypatch.setattr(modeling, "cpu_has_native_bf16", lambda: native)
    metrics = evaluate(EvalConfig(device="cpu"), "pubmedqa", llama_dir, pubmedqa_dir, tmp_path / "out")
    assert metrics["timing"]["dtype"] == ("bfloat16" if native else "float32")
    cpu = torch.device("cpu")
    assert scoring_dtype("float32", cpu) == "float32" and scoring_dtype("float16", cpu) == "float16"
    assert scoring_dtype("auto", torch.device("cuda")) == "auto"  # the checkpoint's 16 bits there


def poisoned_load(*args, **kwargs):
    """The model as loaded, then with NaN in its final norm: what a float16 overflow leaves behind."""
    loaded = runner_load_model(*args, **kwargs)
    with torch.no_grad():
        loaded.model.model.norm.weight.fill_(float("nan"))
    return loaded


def test_non_finite_scores_are_an_error_naming_the_questions_and_the_dtype_fix(llama_dir, pubmedqa_dir, tmp_path,
                                                                                monkeypatch):
    # Before: every NaN row quietly became "yes", the majority baseline's numbers.
    monkeypatch.setattr(runner, "load_model", poisoned_load)
    ids = pubmedqa_frame()["id"].tolist()
    with pytest.raises(ModelError, match=rf"{len(ids)} of {len(ids)} questions got a non-finite .*scored in "
                                         rf"float32 \(ids {', '.join(ids)}\).*Set eval.dtype: bfloat16 or float32"):
        evaluate(EvalConfig(device="cpu", dtype="float32"), "pubmedqa", llama_dir, pubmedqa_dir, tmp_path / "out")
    assert not (tmp_path / "out" / "metrics.json").exists()  # no plausible-looking numbers left behind


def test_check_finite_names_only_the_bad_questions_and_counts_the_rest():
    nan, inf = float("nan"), float("inf")
    runner.check_finite(["a", "b"], [[-1.0, -2.0], [-3.0, -0.5]], "float16")  # finite: nothing to say
    with pytest.raises(ModelError, match=r"^2 of 3 questions .* in float16 \(ids b, c\)"):
        runner.check_finite(["a", "b", "c"], [[-1.0, -2.0], [-1.0, nan], [-inf, -1.0]], "float16")
    with pytest.raises(ModelError, match=r"12 of 12 .*\(ids 0, 1, 2, 3, 4, 5, 6, 7, 8, 9 and 2 more\)"):
        runner.check_finite([str(i) for i in range(12)], [[nan]] * 12, "bfloat16")


def test_non_finite_scores_fail_the_cli_in_one_paragraph(llama_dir, pubmedqa_dir, tmp_path, monkeypatch, capsys):
    from expert.cli import main

    monkeypatch.setenv("EXPERT_ARTIFACTS", str(tmp_path / "artifacts"))  # its fingerprint memo: not the checkout's
    monkeypatch.setattr(runner, "load_model", poisoned_load)
    assert main(["eval", "--model", str(llama_dir), "--benchmark", "pubmedqa", "--data", str(pubmedqa_dir),
                 "--out", str(tmp_path / "out"), "--set", "device=cpu"]) == 2  # ExpertError's exit status
    err = capsys.readouterr().err  # progress bars (model loading, scoring) come first
    assert err.splitlines()[-1].startswith("expert: error: 7 of 7 questions got a non-finite")
    assert "Traceback" not in err
