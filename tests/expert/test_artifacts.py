"""The artifact store: keys, atomic publication, verification."""

import json

import pytest

from expert.artifacts import MANIFEST, ArtifactStore, StageRequest, verify


def request(**changes):
    base = dict(stage="s", version=1, config={"a": 1, "b": [1, 2]}, upstream={"m": "k1"}, inputs={"src": "sha256:x"})
    base.update(changes)
    return StageRequest(**base)


def write_files(out):
    (out / "data.txt").write_text("hello")
    (out / "sub").mkdir()
    (out / "sub" / "x.bin").write_bytes(b"\0" * 10)
    return {"rows": 2}


@pytest.mark.parametrize("change", [
    {"stage": "t"}, {"version": 2}, {"config": {"a": 2, "b": [1, 2]}}, {"config": {"a": 1, "b": [2, 1]}},
    {"upstream": {"m": "k2"}}, {"inputs": {"src": "sha256:y"}},
])
def test_key_changes_with_every_part_of_the_request(change):
    assert request().key != request(**change).key


def test_key_ignores_dict_order():
    assert request(config={"b": [1, 2], "a": 1}).key == request().key


def test_build_publishes_folder_with_manifest_last(tmp_path):
    store = ArtifactStore(tmp_path)
    art = store.build(request(), write_files)
    assert art.path == tmp_path / "s" / request().key
    manifest = json.loads((art.path / MANIFEST).read_text())
    assert manifest["info"] == {"rows": 2}
    assert set(manifest["files"]) == {"data.txt", "sub/x.bin"}
    assert manifest["upstream"] == {"m": "k1"} and manifest["config"] == {"a": 1, "b": [1, 2]}
    assert "torch" in manifest["versions"] and manifest["timings"]["seconds"] >= 0
    assert not [p for p in (tmp_path / "s").iterdir() if p.name.startswith(".tmp")]
    assert store.get(request()).path == art.path


def test_failed_producer_leaves_nothing(tmp_path):
    store = ArtifactStore(tmp_path)

    def boom(out):
        (out / "half.txt").write_text("partial")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        store.build(request(), boom)
    assert store.get(request()) is None
    assert list((tmp_path / "s").iterdir()) == []


def test_folder_without_manifest_does_not_count_and_is_replaced(tmp_path):
    store = ArtifactStore(tmp_path)
    partial = store.path("s", request().key)
    partial.mkdir(parents=True)
    (partial / "data.txt").write_text("partial")
    assert store.get(request()) is None
    art = store.get_or_build(request(), write_files)
    assert (art.path / "data.txt").read_text() == "hello"


def test_corruption_is_detected(tmp_path):
    store = ArtifactStore(tmp_path)
    art = store.build(request(), write_files)
    (art.path / "data.txt").write_text("hellO")  # same size, one byte flipped
    assert "digest" in verify(art.path)
    assert store.get(request()) is None
    (art.path / "data.txt").write_text("hello!")
    assert "size" in verify(art.path)
    (art.path / "data.txt").unlink()
    assert "missing" in verify(art.path)


def test_long_hashing_shows_its_progress_and_short_hashing_does_not(tmp_path, monkeypatch, capsys):
    from expert import artifacts

    art = ArtifactStore(tmp_path).build(request(), write_files)
    assert verify(art.path, full=True) is None
    assert "checking" not in capsys.readouterr().err
    monkeypatch.setattr(artifacts, "PROGRESS_MIN_BYTES", 15)  # the artifact's 15 bytes: "long" now
    assert verify(art.path, full=True) is None
    assert f"checking {art.path.name}" in capsys.readouterr().err
    assert artifacts.describe_files(art.path)["data.txt"]["size"] == 5  # hashing a new artifact: the same
    assert f"hashing {art.path.name}" in capsys.readouterr().err


def test_manifest_of_another_key_does_not_count(tmp_path):
    store = ArtifactStore(tmp_path)
    art = store.build(request(), write_files)
    other = request(version=7)
    art.path.rename(store.path("s", other.key))
    assert store.get(other) is None


def test_work_dir_survives_a_failed_build_and_goes_after_success(tmp_path):
    store = ArtifactStore(tmp_path)
    work = store.work_dir(request())

    def crash(out):
        work.mkdir(parents=True)
        (work / "checkpoint").write_text("step 10")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.build(request(), crash)
    assert (work / "checkpoint").read_text() == "step 10"
    store.build(request(), write_files)
    assert not work.exists()
    assert store.get(request()) is not None


def test_folder_ref_keeps_an_artifacts_key_and_keys_other_folders_by_content(tmp_path):
    from expert.errors import ExpertError
    from expert.workspace import Workspace

    ws = Workspace.at(tmp_path / "ws")
    artifact = ws.store.build(StageRequest("quantize", 1, {"bits": 4}, {}, {}),
                              lambda out: (out / "w.bin").write_bytes(b"w"))
    assert ws.folder_ref(artifact.path) == {"stage": "quantize", "key": artifact.key, "path": str(artifact.path)}
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"a")
    first = ws.folder_ref(folder)
    assert first["stage"] == "external" and len(first["key"]) == 16
    (folder / "adapter_model.safetensors").write_bytes(b"b")
    assert ws.folder_ref(folder)["key"] != first["key"]
    with pytest.raises(ExpertError, match="not a folder"):
        ws.folder_ref(tmp_path / "nope")


def test_replace_rebuilds_a_complete_artifact_and_swaps_it_in(tmp_path):
    store = ArtifactStore(tmp_path)
    first = store.build(request(), lambda out: (out / "a.txt").write_text("old"))
    assert store.build(request(), lambda out: (out / "a.txt").write_text("ignored")).path == first.path
    assert (first.path / "a.txt").read_text() == "old"  # complete: reused, the producer never ran
    again = store.build(request(), lambda out: (out / "a.txt").write_text("new"), replace=True)
    assert again.path == first.path and (again.path / "a.txt").read_text() == "new"
    assert verify(again.path) is None and sorted(p.name for p in first.path.parent.iterdir()) == [first.key]


def test_a_damaged_artifact_is_reported_once_per_process(tmp_path, caplog):
    store = ArtifactStore(tmp_path)
    art = store.build(request(config={"damaged": 1}), write_files)
    target = next(p for p in art.path.rglob("*") if p.is_file() and p.name != MANIFEST)
    target.write_bytes(target.read_bytes() + b"!")
    with caplog.at_level("WARNING", logger="expert.artifacts"):
        assert store.get(request(config={"damaged": 1})) is None
        assert store.get(request(config={"damaged": 1})) is None
    assert [r.getMessage().startswith(f"not using {art.path}") for r in caplog.records] == [True]


def test_downstream_keys_name_the_upstream_files_not_only_its_key(tmp_path):
    """A forced rebuild keeps the upstream's key; if its files change, what reads it gets a new key
    (a run stopped right after that rebuild must not leave the old downstream artifacts cached)."""
    from expert.artifacts import content_id
    from expert.errors import ExpertError
    from expert.stages.base import Stage

    class Reader(Stage):
        name, version = "reader", 1

    store = ArtifactStore(tmp_path)
    up = store.build(request(), lambda out: (out / "w.bin").write_bytes(b"old"))
    config = type("C", (), {"canonical": lambda self: {"x": 1}})()
    before = Reader().request(config, {"model": up.ref()}, {}).key
    same = store.build(request(), lambda out: (out / "w.bin").write_bytes(b"old"), replace=True)
    assert Reader().request(config, {"model": same.ref()}, {}).key == before  # same files: still cached
    new = store.build(request(), lambda out: (out / "w.bin").write_bytes(b"new"), replace=True)
    assert new.key == up.key and Reader().request(config, {"model": new.ref()}, {}).key != before
    # A folder inside the artifact (select's adapter) is named by its artifact's files.
    (new.path / "adapter").mkdir(exist_ok=True)
    assert content_id({**new.ref(), "path": str(new.path / "adapter")}) == content_id(new.ref())
    assert content_id({"stage": "external", "key": "abc", "path": str(tmp_path)}) == "abc"
    with pytest.raises(ExpertError, match="is not \\(inside\\) the artifact other"):
        content_id({**new.ref(), "key": "other"})


def test_reports_are_verified_but_left_out_of_the_content_digest(tmp_path):
    """A rebuild that makes the same model with other timings (a report) leaves the stages after it
    cached; a changed model does not; an old manifest without report marks keeps its digest."""
    import hashlib

    from expert.artifacts import canonical_json, content_id

    store = ArtifactStore(tmp_path)

    def produce(weights: bytes, seconds: str):
        def write(out):
            (out / "w.bin").write_bytes(weights)
            (out / "logs").mkdir()
            (out / "logs" / "timing.json").write_text(seconds)
        return write

    first = store.build(request(), produce(b"w", "1.0"), reports=("logs/*",))
    assert first.manifest["files"]["logs/timing.json"]["report"] is True
    assert "report" not in first.manifest["files"]["w.bin"]
    named = content_id(first.ref())  # (a ref names the folder: read each build's id before the next)
    again = store.build(request(), produce(b"w", "2.5"), replace=True, reports=("logs/*",))
    assert again.manifest["files"]["logs/timing.json"]["sha256"] != first.manifest["files"]["logs/timing.json"]["sha256"]
    assert content_id(again.ref()) == named
    changed = store.build(request(), produce(b"v", "2.5"), replace=True, reports=("logs/*",))
    assert content_id(changed.ref()) != named
    # A report is still checked against its digest: damage there is damage.
    (changed.path / "logs" / "timing.json").write_text("9.9")
    assert "timing.json: content differs" in verify(changed.path)

    # Without marks (manifests written before reports existed) every file counts, as it always did,
    # so upgrading changes no key.
    old = store.build(request(stage="old"), produce(b"w", "1.0"))
    files = {rel: desc["sha256"] for rel, desc in old.manifest["files"].items()}
    digest = hashlib.sha256(canonical_json(files).encode()).hexdigest()[:len(old.key)]
    assert content_id(old.ref()) == f"{old.key}@{digest}"


def test_work_dir_is_removed_under_the_keys_lock(tmp_path, monkeypatch):
    """A forced build of the same key waits for the lock and then writes its own checkpoints into the
    work folder: the finished build must have removed its work folder before letting go of the lock."""
    import shutil
    import threading
    import time

    import expert.artifacts as artifacts

    store = ArtifactStore(tmp_path)
    work = store.work_dir(request())
    rmtree = shutil.rmtree

    def slow_rmtree(path, *args, **kwargs):  # widens the window between the build's end and the removal
        if str(path) == str(work):
            time.sleep(0.5)
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(artifacts.shutil, "rmtree", slow_rmtree)
    survived = {}

    def forced(out):
        work.mkdir(parents=True, exist_ok=True)
        (work / "checkpoint-10").write_text("resume from here")
        time.sleep(1.0)
        survived["checkpoint"] = (work / "checkpoint-10").exists()
        (out / "f").write_text("b")

    first = threading.Thread(target=store.build, args=(request(), lambda out: (out / "f").write_text("a")))
    second = threading.Thread(target=lambda: (time.sleep(0.1), store.build(request(), forced, replace=True)))
    first.start(), second.start()
    first.join(), second.join()
    assert survived == {"checkpoint": True}


def test_a_forced_build_starts_over_and_clears_debris_of_a_killed_replace(tmp_path):
    store = ArtifactStore(tmp_path)
    first = store.build(request(), lambda out: (out / "a.txt").write_text("old"))
    work = store.work_dir(request())
    work.mkdir()
    (work / "checkpoint-10").write_text("written by the code before the fix")
    trash = first.path.parent / f".trash-{first.key}-deadbeef"  # a replace killed mid-way
    trash.mkdir()
    seen = []
    store.build(request(), lambda out: seen.append(sorted(p.name for p in work.glob("*"))) or
                (out / "a.txt").write_text("new"), replace=True)
    assert seen == [[]] and not trash.exists()


def test_a_replaced_folder_is_deleted_only_once_the_new_one_is_in_place(tmp_path, monkeypatch):
    """Deleting a model folder takes seconds: its name must not be missing meanwhile, for a reader
    that opens it by path (another run's stage, `expert eval`)."""
    import shutil
    from pathlib import Path

    import expert.artifacts as artifacts

    store = ArtifactStore(tmp_path)
    first = store.build(request(), lambda out: (out / "a.txt").write_text("old"))
    rmtree, seen = shutil.rmtree, []

    def watching_rmtree(path, *args, **kwargs):
        if Path(path).name.startswith(".trash-"):
            seen.append((first.path / "a.txt").read_text())  # what a reader finds while the old goes
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(artifacts.shutil, "rmtree", watching_rmtree)
    store.build(request(), lambda out: (out / "a.txt").write_text("new"), replace=True)
    assert seen == ["new"] and not list(first.path.parent.glob(".trash-*"))


def test_debris_of_another_key_is_removed_unless_its_build_is_alive(tmp_path):
    """A killed build whose config the user then changed leaves its half-written folder behind:
    the next build in that stage removes it, but never the folder of a build still running."""
    import fcntl

    store = ArtifactStore(tmp_path)
    stage_dir = store.path(request().stage, "x").parent
    stage_dir.mkdir(parents=True)
    killed = [stage_dir / ".tmp-aaaaaaaaaaaaaaaa-1234abcd", stage_dir / ".trash-aaaaaaaaaaaaaaaa-5678abcd"]
    for folder in killed:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"\0" * 64)
    running = stage_dir / ".tmp-bbbbbbbbbbbbbbbb-9abcdef0"
    running.mkdir()
    lock = open(stage_dir / ".lock-bbbbbbbbbbbbbbbb", "a+")  # as the live build holds it
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        built = store.build(request(), write_files)
    finally:
        lock.close()
    assert not any(folder.exists() for folder in killed) and running.is_dir()
    assert sorted(p.name for p in stage_dir.iterdir()) == sorted(
        [built.key, running.name, ".lock-bbbbbbbbbbbbbbbb"])  # the freed key's lock file went with it


def test_a_build_names_the_resumable_work_of_other_configs_once(tmp_path, caplog):
    """Other keys' `.work-` folders stay (their config may run again), but the log says they are
    there and how to remove them; the build's own work folder is not counted."""
    import logging

    store = ArtifactStore(tmp_path)
    stage_dir = store.path(request().stage, "x").parent
    other = stage_dir / ".work-aaaaaaaaaaaaaaaa"
    (other / "gptq-checkpoint").mkdir(parents=True)
    (other / "gptq-checkpoint" / "layer.safetensors").write_bytes(b"\0" * 2_500_000)
    (stage_dir / f".work-{request().key}").mkdir()  # this build's own: resumed, then removed
    with caplog.at_level(logging.INFO, logger="expert.artifacts"):
        store.build(request(), write_files)
        store.build(request(inputs={"src": "sha256:y"}), write_files)  # a second build: said once
    notes = [r.getMessage() for r in caplog.records if "resumable work" in r.getMessage()]
    assert len(notes) == 1, notes
    assert ".work-aaaaaaaaaaaaaaaa" in notes[0] and "1 unfinished" in notes[0] and "2.5 MB" in notes[0]
    assert f"expert clean {stage_dir}" in notes[0] and request().key not in notes[0]
    assert other.is_dir()  # kept
