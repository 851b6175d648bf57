"""The command line: outputs, exit codes, one-paragraph errors."""

import json
import subprocess
import sys

import pandas as pd
import pyarrow.parquet as pq
import pytest

from expert.cli import main
from tests.expert.eval_fixtures import MMLU_SUBJECTS, llama_dir, mmlu_dir  # noqa: F401
from tests.expert.test_eval_resume import crash_after_writes, scored_subjects
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


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback_before_or_after_the_command(tmp_path, capsys, where):
    argv = ["run", str(tmp_path / "nope.yaml")]
    assert main(["--debug"] + argv if where == "before" else argv + ["--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "nope.yaml' does not exist" in err
    assert main(argv) == 2 and "Traceback" not in capsys.readouterr().err


def test_an_empty_config_file_is_refused_not_run_with_the_gpu_sized_defaults(tmp_path, capsys):
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    assert main(["params", str(tmp_path / "empty.yaml")]) == 2
    assert "config file" in (err := capsys.readouterr().err) and "is empty" in err and "configs/default.yaml" in err


@pytest.mark.parametrize("field, value, hint", [
    ("data.pubmedqa.source", "ori_pqal.jsn", "an http(s) URL or hf:ORG/NAME"),
    ("data.mmlu.source", "mmlu/dat", "an http(s) URL or hf:ORG/NAME"),
    ("data.pubmedqa.extra_train_source", "ori_pqaa.json", "an http(s) URL"),
    ("model.source", "HuggingFaceTB/SmolLM2-135M", "a hub model is written hf:HuggingFaceTB/SmolLM2-135M"),
    ("model.source", "gguf:model.gguf", "gguf:FILE"),
    ("quantize.calibration", "calib.txt", "or give 'task'"),
])
def test_a_missing_local_input_is_named_before_prefect_starts(tmp_path, monkeypatch, capsys, field, value, hint):
    import expert.pipeline_config as pipeline_config

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "flows.pipeline", None)  # the flow (and Prefect) must not be needed
    assert main(["run", str(pipeline_config.PRESETS_DIR / "default.yaml"), "--set", f"{field}={value}"]) == 2
    err = capsys.readouterr().err
    shown = value.removeprefix("gguf:")
    assert f"{field} '{value}' does not exist (resolved to {tmp_path / shown})" in err and hint in err


def test_an_existing_local_input_and_remote_ones_pass_the_check(tmp_path):
    from expert.pipeline_config import check_local_sources, load_preset

    (tmp_path / "calib.txt").write_text("text")
    check_local_sources(load_preset("default", [f"quantize.calibration={tmp_path / 'calib.txt'}"]))  # URL, hf:, embedded:
    check_local_sources(load_preset("default", ["data.mmlu=null", "quantize.method=nf4",
                                                "quantize.calibration=nowhere.txt"]))  # nf4 reads no calibration


def test_out_that_is_a_file_or_unwritable_is_said_before_the_work(tmp_path, capsys, monkeypatch):
    import expert.benchmarks.mmlu as mmlu

    monkeypatch.setattr(mmlu, "format_mmlu", lambda *a, **k: pytest.fail("the work started"))
    src = write_mmlu_dir(tmp_path / "mmlu")
    (tmp_path / "afile").write_text("x")
    assert main(["format", "mmlu", "--source", str(src), "--out", str(tmp_path / "afile")]) == 2
    assert f"--out '{tmp_path / 'afile'}' is a file" in capsys.readouterr().err
    assert main(["format", "mmlu", "--source", str(src), "--out", str(tmp_path / "afile" / "sub")]) == 2
    assert "cannot write in" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "mmlu"]  # no temp folder left, nothing fetched


def test_eval_checks_the_adapter_before_loading_the_model_and_takes_eval_prefixed_settings(tmp_path, capsys,
                                                                                         monkeypatch):
    from transformers import AutoModelForCausalLM

    from tests.fixtures.models import tiny_llama_dir

    model = tiny_llama_dir(tmp_path / "model")
    src = write_pubmedqa_json(tmp_path / "ori_pqal.json", n=60)
    assert main(["format", "pubmedqa", "--source", str(src), "--out", str(tmp_path / "data")]) == 0
    (tmp_path / "adapter").mkdir()
    argv = ["eval", "--model", str(model), "--benchmark", "pubmedqa", "--data", str(tmp_path / "data"),
            "--out", str(tmp_path / "eval")]
    with monkeypatch.context() as patch:  # not monkeypatch.undo(): that would drop EXPERT_ARTIFACTS too
        patch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
        assert main(argv + ["--adapter", str(tmp_path / "adapter")]) == 2
    assert "lacks adapter_config.json" in capsys.readouterr().err
    assert main(argv + ["--set", "eval.batch_size=4", "--set", "mmlu_max_per_subject=2"]) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["scoring"]["batch_size"] == 4


def test_eval_of_one_benchmark_on_the_others_data_says_which_it_is(tmp_path, capsys):
    from tests.fixtures.models import tiny_llama_dir

    model = tiny_llama_dir(tmp_path / "model")
    assert main(["format", "mmlu", "--source", str(write_mmlu_dir(tmp_path / "mmlu")), "--out",
                 str(tmp_path / "mmlu_out")]) == 0
    assert main(["format", "pubmedqa", "--source", str(write_pubmedqa_json(tmp_path / "p.json", n=60)), "--out",
                 str(tmp_path / "pq_out")]) == 0
    capsys.readouterr()
    for benchmark, data, found in (("pubmedqa", "mmlu_out", "mmlu"), ("mmlu", "pq_out", "pubmedqa")):
        assert main(["eval", "--model", str(model), "--benchmark", benchmark, "--data", str(tmp_path / data),
                     "--out", str(tmp_path / "e")]) == 2
        err = capsys.readouterr().err
        assert f"holds {found} data, not {benchmark}" in err and f"--benchmark {found}" in err
        (tmp_path / data / "stats.json").unlink()  # without stats.json, by its columns
        assert main(["eval", "--model", str(model), "--benchmark", benchmark, "--data", str(tmp_path / data),
                     "--out", str(tmp_path / "e")]) == 2
        assert f"holds {found} data" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["eval", "--model", str(model), "--benchmark", "mmlu", "--data", str(tmp_path / "empty"),
                 "--out", str(tmp_path / "e")]) == 2
    assert "`expert format mmlu --source ... --out" in capsys.readouterr().err


def test_a_bad_tokenizer_folder_is_named(tmp_path, capsys):
    src = write_pubmedqa_json(tmp_path / "ori_pqal.json", n=60)
    (tmp_path / "nomodel").mkdir()
    (tmp_path / "nomodel" / "weights.bin").write_bytes(b"junk")
    for folder in ("nomodel", "missing"):
        assert main(["format", "pubmedqa", "--source", str(src), "--out", str(tmp_path / "out"), "--tokenizer",
                     str(tmp_path / folder), "--max-prompt-tokens", "100"]) == 2
        assert f"--tokenizer '{tmp_path / folder}' is not a model folder with a tokenizer" in capsys.readouterr().err
    (tmp_path / "broken").mkdir()  # the tokenizer's files are there but do not load: named too, no traceback
    (tmp_path / "broken" / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vo')
    (tmp_path / "broken" / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    assert main(["format", "pubmedqa", "--source", str(src), "--out", str(tmp_path / "out"), "--tokenizer",
                 str(tmp_path / "broken"), "--max-prompt-tokens", "100"]) == 2
    err = capsys.readouterr().err
    assert f"--tokenizer '{tmp_path / 'broken'}': its tokenizer does not load" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, said, not_said", [
    (["format", "pubmedqa", "--fold", "12"], "'--fold': Input should be less than or equal to 9", "'fold'"),
    (["format", "pubmedqa", "--max-prompt-tokens", "100"],
     "--max-prompt-tokens is set but no tokenizer was given: pass the model's tokenizer (--tokenizer MODEL_DIR)",
     "data.pubmedqa.max_prompt_tokens"),
    (["format", "mmlu", "--num-shots", "-1"], "'--num-shots': Input should be greater than or equal to 0",
     "'num_shots'"),
    (["import-model", "--source", "no-such-model"], "--source 'no-such-model': no such file or folder",
     "model.source"),
])
def test_flag_commands_name_the_flags_not_the_config_fields(tmp_path, capsys, argv, said, not_said):
    source = {"pubmedqa": write_pubmedqa_json(tmp_path / "ori_pqal.json", n=60),
              "mmlu": write_mmlu_dir(tmp_path / "mmlu")}.get(argv[1])
    argv = argv + (["--source", str(source)] if source else []) + ["--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert said in err and not_said not in err, err


def test_verify_of_a_folder_outside_the_store_says_what_it_checks(tmp_path, capsys):
    src = write_mmlu_dir(tmp_path / "mmlu")
    assert main(["format", "mmlu", "--source", str(src), "--out", str(tmp_path / "out")]) == 0
    assert main(["verify", str(tmp_path / "out")]) == 2
    assert "verify checks the artifact store's folders, artifacts/<stage>/<key>" in capsys.readouterr().err


def eval_argv(model, data, out, *extra) -> list[str]:
    return ["eval", "--model", str(model), "--benchmark", "mmlu", "--data", str(data), "--out", str(out),
            "--set", "device=cpu", "--set", "dtype=float32", "--set", "batch_size=2", *extra]


def work_folders(out):
    return sorted(out.parent.glob(f".{out.name}.work-*"))


def killed_after_one_subject(monkeypatch, argv) -> list[str]:
    """Run `argv`, killed right after its first MMLU subject was kept; the subjects kept."""
    with monkeypatch.context() as patch:  # undone on leaving; the test's EXPERT_ARTIFACTS stays
        written = crash_after_writes(patch, 1, "subject")
        assert main(argv) == 1
    return written


def test_eval_killed_after_a_subject_resumes_with_the_same_command(llama_dir, mmlu_dir, tmp_path, monkeypatch,
                                                                   capsys):
    assert main(eval_argv(llama_dir, mmlu_dir, tmp_path / "reference")) == 0  # uninterrupted
    out = tmp_path / "eval"
    written = killed_after_one_subject(monkeypatch, eval_argv(llama_dir, mmlu_dir, out))
    assert not out.exists() and len(work_folders(out)) == 1
    capsys.readouterr()
    calls = scored_subjects(monkeypatch)
    assert main(eval_argv(llama_dir, mmlu_dir, out)) == 0
    assert calls == [sorted(set(MMLU_SUBJECTS) - set(written))]  # the kept subject was not scored again
    assert "resuming: 1 MMLU subject(s) scored by an earlier attempt" in capsys.readouterr().err
    pd.testing.assert_frame_equal(pd.read_parquet(out / "predictions.parquet"),
                                  pd.read_parquet(tmp_path / "reference" / "predictions.parquet"))
    assert work_folders(out) == [] and work_folders(tmp_path / "reference") == []


@pytest.mark.parametrize("change", ["model weights at the same path", "adapter", "max_length"])
def test_eval_after_a_kill_with_other_inputs_scores_every_subject(mmlu_dir, tmp_path, monkeypatch, change):
    from tests.expert.test_eval_adapter import save_adapter
    from tests.fixtures.models import tiny_llama_dir

    model, out = tiny_llama_dir(tmp_path / "model", seed=0), tmp_path / "eval"
    killed_after_one_subject(monkeypatch, eval_argv(model, mmlu_dir, out))
    kept = work_folders(out)
    extra = []
    if change == "adapter":
        extra = ["--adapter", str(save_adapter(model, tmp_path / "adapter", 0.05))]
    elif change == "max_length":
        extra = ["--set", "max_length=32"]  # shorter than the prompts: other scores
    else:
        tiny_llama_dir(model, seed=1)
    calls = scored_subjects(monkeypatch)
    assert main(eval_argv(model, mmlu_dir, out, *extra)) == 0
    assert calls == [sorted(MMLU_SUBJECTS)]  # nothing scored for other inputs was reused
    assert work_folders(out) == kept  # that work stays for a rerun of its own inputs


def test_eval_no_resume_scores_everything_and_leaves_no_work_folder(llama_dir, mmlu_dir, tmp_path, monkeypatch,
                                                                    capsys):
    out = tmp_path / "eval"
    killed_after_one_subject(monkeypatch, eval_argv(llama_dir, mmlu_dir, out))
    assert len(work_folders(out)) == 1
    capsys.readouterr()
    calls = scored_subjects(monkeypatch)
    assert main(eval_argv(llama_dir, mmlu_dir, out, "--no-resume")) == 0
    assert calls == [sorted(MMLU_SUBJECTS)] and "resuming" not in capsys.readouterr().err
    assert (out / "predictions.parquet").is_file() and work_folders(out) == []


def test_expert_clean_removes_a_killed_evals_work_but_not_a_running_evals(llama_dir, mmlu_dir, tmp_path,
                                                                         monkeypatch, capsys):
    import expert.evaluation as evaluation
    from expert.cleanup import clean

    out = tmp_path / "eval"
    killed_after_one_subject(monkeypatch, eval_argv(llama_dir, mmlu_dir, out))
    (kept,) = work_folders(out)
    real, seen = evaluation.evaluate, []

    def evaluate(*args, **kwargs):  # while the rerun scores, its work folder is in use
        seen.extend(outcome for path, _, outcome in clean(tmp_path) if path == kept)
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(evaluation, "evaluate", evaluate)
        assert main(eval_argv(llama_dir, mmlu_dir, out)) == 0
    assert seen == ["in use"] and work_folders(out) == []
    assert [p.name for p in tmp_path.glob(".eval.lock-*")] == []  # the lock leaves no file

    other = tmp_path / "other"
    killed_after_one_subject(monkeypatch, eval_argv(llama_dir, mmlu_dir, other))
    (left,) = work_folders(other)
    capsys.readouterr()
    assert main(["clean", str(tmp_path), "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith(f"would be removed  {left} (")
    assert main(["clean", str(tmp_path)]) == 0 and not left.exists()


def test_a_new_out_appears_by_one_rename_and_an_existing_one_keeps_its_other_files(tmp_path, monkeypatch):
    import os
    import stat

    src = write_pubmedqa_json(tmp_path / "ori_pqal.json", n=60)
    out, real, renamed = tmp_path / "out", os.replace, []
    monkeypatch.setattr(os, "replace", lambda a, b: renamed.append(b) or real(a, b))
    argv = ["format", "pubmedqa", "--source", str(src), "--out", str(out)]
    assert main(argv) == 0
    # Whole or not at all: a kill between file-by-file moves would leave a folder that looks finished.
    assert [p for p in renamed if str(p).startswith(str(out))] == [out]
    (tmp_path / "made").mkdir()  # the permissions of any new folder, not a temp folder's 0700
    assert stat.S_IMODE(out.stat().st_mode) == stat.S_IMODE((tmp_path / "made").stat().st_mode)
    (out / "notes.txt").write_text("mine")
    renamed.clear()
    assert main(argv) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "train.parquet").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folders left


def test_expert_run_ends_with_the_export_command(tmp_path, monkeypatch, capsys):
    """The pipeline's result names the selected adapter; `expert run` turns it into the command
    that takes the expert out of the store (the flow itself is faked: tests/flows run it)."""
    import yaml

    import flows.hangup
    import flows.pipeline
    import flows.quiet_errors
    import flows.temporary_server
    from expert.cli import PREFECT_DEFAULTS
    from tests.fixtures.pipeline import tiny_config_dict, tiny_inputs

    for key in (*PREFECT_DEFAULTS, "PREFECT_HOME"):  # set for the test only: restored after it
        monkeypatch.setenv(key, "0")
    select = tmp_path / "artifacts" / "select" / "0123456789abcdef"
    result = {"report": "r", "expert": {"model": "m", "adapter": str(select / "adapter")}}
    monkeypatch.setattr(flows.pipeline, "pipeline", lambda config, force: result)
    for module, name in ((flows.temporary_server, "detach_temporary_server"), (flows.hangup, "stop_on_hangup"),
                         (flows.quiet_errors, "user_errors_without_traceback")):
        monkeypatch.setattr(module, name, lambda: None)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(tiny_inputs(tmp_path / "inputs"))))
    assert main(["run", str(config)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == result
    assert f"to take the expert out of the store: expert export {select} --out DIR" in err
