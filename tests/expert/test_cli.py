"""The command line: outputs, exit codes, one-paragraph errors."""

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from expert.cli import main
from tests.fixtures.data import write_mmlu_dir, write_pubmedqa_json


@pytest.fixture(autouse=True)
def _workspace(tmp_path, monkeypatch):
    monkeypatch.setenv("EXPERT_ARTIFACTS", str(tmp_path / "artifacts"))


@pytest.mark.parametrize("argv", [[], ["run"], ["params"], ["format"], ["format", "pubmedqa"], ["import-model"],
                                  ["eval"]])
def test_help_for_every_command(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv + ["--help"])
    assert exit_.value.code == 0
    assert "usage: expert" in capsys.readouterr().out


def test_format_pubmedqa_writes_the_splits(tmp_path, capsys):
    src = write_pubmedqa_json(tmp_path / "ori_pqal.json", n=60)
    assert main(["format", "pubmedqa", "--source", str(src), "--out", str(tmp_path / "out"), "--fold", "2"]) == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["dev.parquet", "stats.json", "test.parquet", "train.parquet"]
    sizes = {s: pq.read_table(tmp_path / "out" / f"{s}.parquet").num_rows for s in ("train", "dev", "test")}
    assert sum(sizes.values()) == 60 and sizes["test"] == 30
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["fold"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # temp folder cleaned


def test_format_mmlu_writes_dev_and_test(tmp_path):
    src = write_mmlu_dir(tmp_path / "mmlu")
    assert main(["format", "mmlu", "--source", str(src), "--out", str(tmp_path / "out")]) == 0
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"dev.parquet", "test.parquet", "stats.json"}


def test_bad_input_is_one_paragraph_exit_2_and_no_output(tmp_path, capsys):
    bad = tmp_path / "ori_pqal.json"
    bad.write_text("{not json")
    assert main(["format", "pubmedqa", "--source", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("expert: error:") and "ori_pqal.json" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_missing_model_path_exits_2(tmp_path, capsys):
    assert main(["import-model", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "m")]) == 2
    assert "nope" in capsys.readouterr().err


def test_bad_config_key_fails_before_prefect_starts(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  pubmedqa:\n    fodl: 3\n")
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "data.pubmedqa.fodl" in err and "did you mean 'fold'" in err


def test_unknown_force_stage_is_named_with_a_hint_before_prefect_starts(capsys):
    assert main(["run", "configs/default.yaml", "--force", "trian"]) == 2
    err = capsys.readouterr().err
    assert "unknown stage 'trian'" in err and "did you mean 'train'" in err


def test_params_prints_the_deployment_parameters(capsys):
    assert main(["params", "configs/default.yaml", "--set", "train.learning_rate=0.0003", "--force", "select"]) == 0
    params = json.loads(capsys.readouterr().out)
    assert params["force"] == ["select"] and params["config"]["train"]["learning_rate"] == 0.0003
    assert params["config"]["name"] == "smollm2-pubmedqa"
    assert main(["params", "configs/default.yaml", "--evaluate"]) == 0
    params = json.loads(capsys.readouterr().out)
    assert set(params) == {"data", "evaluation", "artifacts_dir"} and params["evaluation"]["mmlu_max_per_subject"] == 2


def test_bad_override_value_is_named(tmp_path, capsys):
    assert main(["run", "configs/default.yaml", "--set", "data.pubmedqa.fold=12"]) == 2
    assert "data.pubmedqa.fold" in capsys.readouterr().err


def test_unexpected_error_is_one_paragraph_exit_1(monkeypatch, tmp_path, capsys):
    import expert.benchmarks.mmlu as mmlu

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(mmlu, "format_mmlu", boom)
    src = write_mmlu_dir(tmp_path / "mmlu")
    assert main(["format", "mmlu", "--source", str(src), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "RuntimeError: disk on fire" in err and "--debug" in err and "Traceback" not in err


def test_module_entry_point_runs(tmp_path):
    out = subprocess.run([sys.executable, "-m", "expert.cli", "format", "mmlu", "--source", str(tmp_path / "none"),
                          "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert out.returncode == 2 and "does not exist" in out.stderr


def test_eval_writes_metrics_predictions_and_report(tmp_path, capsys):
    from tests.fixtures.models import tiny_llama_dir

    model = tiny_llama_dir(tmp_path / "model")
    src = write_pubmedqa_json(tmp_path / "ori_pqal.json", n=60)
    assert main(["format", "pubmedqa", "--source", str(src), "--out", str(tmp_path / "data")]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(model), "--benchmark", "pubmedqa", "--data", str(tmp_path / "data"),
                 "--out", str(tmp_path / "eval"), "--set", "batch_size=4"]) == 0
    printed = json.loads(capsys.readouterr().out)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert printed["accuracy"] == metrics["accuracy"] and printed["n"] == 30
    preds = json.loads((tmp_path / "eval" / "pubmedqa_preds.json").read_text())
    assert set(preds) == set(pq.read_table(tmp_path / "data" / "test.parquet").column("id").to_pylist())
    assert (tmp_path / "eval" / "report.md").is_file()


def test_eval_unknown_setting_is_named(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "d").mkdir()
    assert main(["eval", "--model", str(tmp_path / "m"), "--benchmark", "mmlu", "--data", str(tmp_path / "d"),
                 "--out", str(tmp_path / "o"), "--set", "mmlu_max_per_subjekt=3"]) == 2
    assert "did you mean 'mmlu_max_per_subject'" in capsys.readouterr().err
