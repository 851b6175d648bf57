"""`expert clean`: what unfinished builds left is removed, unless a live build holds it."""

from __future__ import annotations

import os
import time

from expert.cleanup import clean
from expert.cli import main
from expert.locks import exclusive

OLD, NEW, LIVE = "a" * 16, "b" * 16, "c" * 16


def leftover(folder, days_ago: float = 0.0, size: int = 1000):
    folder.mkdir(parents=True)
    (folder / "state.bin").write_bytes(b"x" * size)
    stamp = time.time() - days_ago * 86400
    for path in (folder / "state.bin", folder):
        os.utime(path, (stamp, stamp))
    return folder


def store(root):
    """A store with a finished artifact, old and new resumable work, crash debris, and a live build's work."""
    (root / "train" / NEW).mkdir(parents=True)  # an artifact: never a leftover
    (root / "train" / NEW / "manifest.json").write_text("{}")
    return {"old work": leftover(root / "quantize" / f".work-{OLD}", days_ago=10, size=3000),
            "debris": leftover(root / "quantize" / f".tmp-{NEW}-1234abcd", days_ago=2),
            "new work": leftover(root / "train" / f".work-{NEW}"),
            "live work": leftover(root / "train" / f".work-{LIVE}", days_ago=10)}


def test_a_dry_run_lists_and_keeps_and_a_run_removes_all_but_a_live_builds(tmp_path):
    made = store(tmp_path)
    with exclusive(tmp_path / "train" / f".lock-{LIVE}", "a build still running"):
        seen = {path: outcome for path, _, outcome in clean(tmp_path, dry_run=True)}
        assert seen == {made["old work"]: "would be removed", made["debris"]: "would be removed",
                        made["new work"]: "would be removed", made["live work"]: "in use"}
        assert all(path.is_dir() for path in made.values())
        seen = {path: (size, outcome) for path, size, outcome in clean(tmp_path)}
        assert seen[made["old work"]] == (3000, "removed") and seen[made["live work"]] == (1000, "in use")
    assert [name for name, path in made.items() if path.exists()] == ["live work"]
    assert (tmp_path / "train" / NEW / "manifest.json").is_file()
    assert not (tmp_path / "quantize" / f".lock-{OLD}").exists()  # the lock taken to check leaves no file


def test_older_than_keeps_recent_work_and_the_cli_says_what_it_freed(tmp_path, capsys):
    made = store(tmp_path)
    assert main(["clean", str(tmp_path), "--older-than", "5"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"removed  {made['old work']} (0.0 MiB)", f"removed  {made['live work']} (0.0 MiB)"]
    assert "freed 0.0 MiB" in err
    assert sorted(name for name, path in made.items() if path.exists()) == ["debris", "new work"]
    assert main(["clean", str(tmp_path / "quantize"), "--dry-run"]) == 0  # a stage folder
    assert capsys.readouterr().out.splitlines() == [f"would be removed  {made['debris']} (0.0 MiB)"]


def test_the_default_is_the_workspace_and_bad_arguments_exit_2(tmp_path, monkeypatch, capsys):
    made = store(tmp_path / "store")
    monkeypatch.setenv("EXPERT_ARTIFACTS", str(tmp_path / "store"))
    assert main(["clean", "--dry-run"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(made)
    assert main(["clean", "--older-than", "-1"]) == 2
    assert "--older-than -1: give a number of days" in capsys.readouterr().err
    assert main(["clean", str(tmp_path / "nope")]) == 2
    assert "is not a folder; give the artifacts root, a stage folder (artifacts/train) or the folder of an " \
        "`expert eval --out`" in capsys.readouterr().err
