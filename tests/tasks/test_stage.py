"""The shared task mechanism, called without a flow (the flow tests run it for real)."""

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
