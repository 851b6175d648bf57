"""The shared task mechanism, called without a flow (the flow tests run it for real)."""

import json

from tasks import stage


def test_cache_key_is_the_stage_key_not_the_run():
    assert stage._stage_cache_key(None, {"cache_key": "train-abc-123", "config": object()}) == "train-abc-123"


def test_progress_artifact_is_created_once_and_updated_sparingly(monkeypatch):
    created, updated = [], []
    monkeypatch.setattr(stage, "create_progress_artifact", lambda pct, description: created.append(pct) or "id-1")
    monkeypatch.setattr(stage, "update_progress_artifact", lambda artifact_id, pct: updated.append((artifact_id, pct)))
    progress = stage._ProgressArtifact("train [k]")
    for done in range(1, 1001):
        progress(done, 1000)
    assert created == [0.1]
    assert 90 <= len(updated) <= 101  # about once per percent, not once per step
    assert updated[-1] == ("id-1", 100.0)
    assert all(b[1] > a[1] for a, b in zip(updated, updated[1:]))


def test_read_json_reads_an_artifact_file(tmp_path):
    (tmp_path / "scores.json").write_text('[{"step": 2}]')
    assert stage.read_json({"path": str(tmp_path)}, "scores.json") == [{"step": 2}]


def test_evaluation_artifact_keys_are_valid_prefect_keys_for_any_label(tmp_path, monkeypatch):
    """The evaluate deployment's `label` is free text; Prefect takes only [a-z0-9-] in artifact keys."""
    from prefect.types.names import raise_on_name_alphanumeric_dashes_only

    from expert.evaluation.metrics import pubmedqa_metrics
    from tasks import evaluate

    metrics = pubmedqa_metrics(["yes", "no", "maybe"], ["yes", "no", "no"])
    (tmp_path / "metrics.json").write_text(json.dumps({**metrics, "n": 3}))
    (tmp_path / "report.md").write_text("# r\n")
    keys = []
    monkeypatch.setattr(evaluate, "create_table_artifact", lambda rows, key, description: keys.append(key))
    monkeypatch.setattr(evaluate, "create_markdown_artifact", lambda text, key, description: keys.append(key))
    evaluate.publish("pubmedqa", {"path": str(tmp_path)}, "Llama-3.1 8B_v2 (fold 0)")
    assert keys and all(raise_on_name_alphanumeric_dashes_only(k, "key") for k in keys), keys
    assert keys[-1] == "pubmedqa-llama-3-1-8b-v2-fold-0-report"
    assert evaluate.artifact_key("pubmedqa", "") == "pubmedqa" and evaluate.artifact_key("--", "") == "model"


def test_a_piece_on_a_dask_worker_logs_the_library_at_info(monkeypatch):
    """A worker process never ran a stage task, which is where the library's loggers get INFO."""
    import logging

    from expert.fanout import Piece
    from tasks.fanout import run_piece

    library = logging.getLogger("expert")
    monkeypatch.setattr(library, "level", logging.NOTSET)  # a fresh worker process: the root's WARNING
    assert run_piece.fn(Piece("p", logging.getLogger("expert.evaluation").getEffectiveLevel)) == logging.INFO
