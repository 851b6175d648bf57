"""Checkpoint selection: the best dev score wins, ties go to the earlier step, NaN never wins."""

from pathlib import Path

import pandas as pd
import pytest

from expert.errors import ExpertError
from expert.select import SelectConfig, _row, pick_best

NAN = float("nan")


def rows(*triples):
    return [{"step": s, "accuracy": a, "macro_f1": f, "dev_loss": l} for s, a, f, l in triples]


@pytest.mark.parametrize("metric, expected", [("accuracy", 20), ("macro_f1", 30), ("dev_loss", 10)])
def test_pick_best_by_metric(metric, expected):
    table = rows((10, 0.5, 0.3, 0.9), (20, 0.7, 0.4, 1.0), (30, 0.6, 0.5, 1.1))
    assert pick_best(table, metric)["step"] == expected


@pytest.mark.parametrize("metric", ["accuracy", "dev_loss"])
def test_ties_go_to_the_earlier_step_whatever_the_order(metric):
    table = rows((30, 0.7, 0.4, 0.8), (10, 0.7, 0.4, 0.8), (20, 0.6, 0.3, 0.9))
    assert pick_best(table, metric)["step"] == 10


@pytest.mark.parametrize("metric, expected", [("accuracy", 20), ("macro_f1", 30), ("dev_loss", 30)])
def test_a_nan_score_of_a_diverged_checkpoint_never_wins(metric, expected):
    # NaN first: max() keeps the first item it meets unless something compares greater, and nothing does.
    table = rows((10, NAN, NAN, NAN), (20, 0.7, 0.4, NAN), (40, NAN, NAN, NAN), (30, 0.6, 0.5, 0.9))
    assert pick_best(table, metric)["step"] == expected


def test_every_score_nan_is_an_error_saying_training_diverged():
    table = rows((10, 0.5, 0.3, NAN), (20, 0.7, 0.4, NAN))
    with pytest.raises(ExpertError, match=r"select.metric dev_loss is NaN .* \(steps 10, 20\): training diverged"
                                          r".* lower train.learning_rate"):
        pick_best(table, "dev_loss")
    assert pick_best(table, "accuracy")["step"] == 20  # another metric still selects


def test_dev_loss_is_what_its_description_says():
    # score_frame's scores: each choice's log-likelihood summed over the tokens of " {choice}".
    frame = pd.DataFrame({"choices": [["yes", "no", "maybe"]] * 2, "answer": ["yes", "no"]})
    row = _row(10, Path("step-000010"), frame, [[-1.5, -2.0, -3.0], [-0.5, -4.0, -1.0]])
    assert row["dev_loss"] == (1.5 + 4.0) / 2  # the gold answer's summed NLL, averaged over the questions
    described = SelectConfig.model_fields["metric"].description
    assert "summed over its tokens (no EOS), averaged over the dev questions" in described, described


@pytest.mark.parametrize("metric", ["accuracy", "macro_f1", "dev_loss"])
def test_a_checkpoint_whose_scores_are_nan_loses_on_every_metric(metric):
    """Predicted from, all-NaN scores answer "yes" everywhere: the majority class, a plausible
    accuracy (here the best one) from a diverged checkpoint."""
    frame = pd.DataFrame({"choices": [["yes", "no", "maybe"]] * 4, "answer": ["yes", "yes", "yes", "no"]})
    diverged = _row(20, Path("step-20"), frame, [[NAN, NAN, NAN]] * 3 + [[NAN, -1.0, -2.0]])
    sound = _row(10, Path("step-10"), frame, [[-1.0, -0.5, -3.0]] * 2 + [[-0.5, -1.0, -3.0]] * 2)
    assert sound["accuracy"] == 0.25
    assert pick_best([diverged, sound], metric)["step"] == 10


def test_a_rerun_after_a_crash_scores_only_the_checkpoints_still_missing(tmp_path, monkeypatch, caplog):
    """Each checkpoint's row is kept in the work folder as it is scored; a rerun after a crash
    scores the rest and returns the rows of an uninterrupted selection; a kept row of another
    dtype or GPTQ kernel is scored again."""
    import json
    import logging

    from expert import select
    from expert.evaluation import EvalConfig
    from expert.evaluation import runner
    from tests.expert.eval_fixtures import pubmedqa_frame, write_frame
    from tests.expert.test_eval_resume import Crash, crash_after_writes
    from tests.expert.test_eval_adapter import save_adapter
    from tests.fixtures.models import tiny_llama_dir

    llama = tiny_llama_dir(tmp_path / "llama")
    data = tmp_path / "data"
    write_frame(pubmedqa_frame("dev").iloc[:4], data / "dev.parquet")
    checkpoints = [(step, save_adapter(llama, tmp_path / f"step{step}", b)) for step, b in ((2, 0.02), (4, 0.05),
                                                                                             (6, None))]
    dev = EvalConfig(device="cpu", dtype="float32", batch_size=2, pubmedqa_split="dev")
    whole = select.score_checkpoints(dev, llama, checkpoints, data)  # no work folder: nothing kept
    assert len({r["dev_loss"] for r in whole}) == 3  # the checkpoints do score differently

    work = tmp_path / "work"
    written = crash_after_writes(monkeypatch, 2, "step")
    with pytest.raises(Crash):
        select.score_checkpoints(dev, llama, checkpoints, data, work_dir=work)
    assert written == [2, 4]  # killed right after the second checkpoint's score was kept
    monkeypatch.undo()
    scored = []
    real_score = runner.score_frame
    monkeypatch.setattr(runner, "score_frame", lambda model, *a, **k: scored.append(model.active_adapter)
                        or real_score(model, *a, **k))
    assert select.score_checkpoints(dev, llama, checkpoints, data, work_dir=work) == whole
    assert scored == ["step6"]

    # A row kept with another dtype, or another GPTQ kernel ('auto' on the first attempt's machine).
    for step, field, value in (("step2", "dtype", "bfloat16"), ("step4", "gptq_kernel", "MarlinLinear")):
        kept = work / select.KEPT_ROWS / f"{step}.json"
        kept.write_text(json.dumps({**json.loads(kept.read_text()), field: value}))
        scored.clear()
        with caplog.at_level(logging.WARNING, logger="expert.evaluation.resume"):
            assert select.score_checkpoints(dev, llama, checkpoints, data, work_dir=work) == whole
        assert scored == [step] and f"scored with {field} '{value}'" in caplog.text


def test_the_select_stage_gives_its_work_folder(monkeypatch, tmp_path):
    from expert import select
    from expert.evaluation import EvalConfig
    from expert.stages.tuning import Select

    seen = {}
    monkeypatch.setattr(select, "select_checkpoint", lambda *a, **k: seen.update(k) or {})
    Select(eval_config=EvalConfig()).produce(SelectConfig(), {"model": tmp_path, "train": tmp_path, "data": tmp_path},
                                             {}, tmp_path / "out", work_dir=tmp_path / "work")
    assert seen["work_dir"] == tmp_path / "work"
