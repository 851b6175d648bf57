"""expert.atomic: a small file is replaced whole or not at all."""

import os

import pytest

from expert import atomic


def test_the_text_replaces_the_file_and_no_temp_file_stays(tmp_path):
    target = tmp_path / "meta.json"
    target.write_text("old")
    atomic.write_text_atomic(target, "new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["meta.json"]


def test_a_crash_before_the_rename_leaves_the_old_file_whole(tmp_path, monkeypatch):
    target = tmp_path / "meta.json"
    target.write_text("old")

    def killed(*args):
        raise KeyboardInterrupt("killed before the rename")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        atomic.write_text_atomic(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir() if p.name != "meta.json"] == [f".meta.json.{os.getpid()}.tmp"]
