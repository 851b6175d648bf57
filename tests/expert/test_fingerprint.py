import hashlib
import os

from expert.fingerprint import FingerprintCache


def test_file_and_tree_fingerprints_follow_content(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "a.json").write_text("{}")
    (d / "w.bin").write_bytes(b"123")
    cache = FingerprintCache(tmp_path / "memo.json")
    tree = cache.path(d)
    assert tree.startswith("sha256-tree:") and cache.path(d / "a.json").startswith("sha256:")
    (d / "w.bin").write_bytes(b"124")
    assert cache.path(d) != tree
    (d / "w.bin").write_bytes(b"123")
    assert cache.path(d) == tree
    (d / "w.bin").rename(d / "v.bin")  # a renamed file is a different model folder
    assert cache.path(d) != tree


def test_memo_avoids_rehashing_unchanged_files(tmp_path, monkeypatch):
    f = tmp_path / "data.json"
    f.write_text("x" * 100)
    FingerprintCache(tmp_path / "memo.json").path(f)
    calls = []
    monkeypatch.setattr("expert.fingerprint.file_digest", lambda p: calls.append(p) or "d")
    again = FingerprintCache(tmp_path / "memo.json")  # a new process reading the memo
    again.path(f)
    assert calls == []
    f.write_text("y" * 101)
    os.utime(f, ns=(1, 1))
    again.path(f)
    assert calls == [f.resolve()]


def test_tree_fingerprint_follows_symlinked_folders_and_ends_on_a_loop(tmp_path):
    """MMLU's reader globs `test/*_test.csv`, which follows a symlinked `test/`: so must the fingerprint."""
    real = tmp_path / "real_test"
    real.mkdir()
    (real / "anatomy_test.csv").write_text("q,a,b,c,d,A\n")
    data = tmp_path / "mmlu"
    data.mkdir()
    (data / "test").symlink_to(real, target_is_directory=True)
    (real / "up").symlink_to(data, target_is_directory=True)  # a loop back up the tree
    cache = FingerprintCache(None)
    before = cache.path(data)
    (real / "anatomy_test.csv").write_text("q2,a,b,c,d,B\n")
    os.utime(real / "anatomy_test.csv", ns=(2, 2))
    assert cache.path(data) != before


def test_a_file_corrected_at_the_same_size_and_timestamp_is_hashed_again(tmp_path):
    """What `rsync -a`, `cp -p` or `wget -N` leave: new content, the old size and mtime."""
    f = tmp_path / "ori_pqal.json"
    f.write_text('{"label": "yes"}')
    stamp = f.stat().st_mtime_ns
    cache = FingerprintCache(tmp_path / "memo.json")
    first = cache.path(f)
    f.write_text('{"label": "nop"}')  # in place, same size
    os.utime(f, ns=(stamp, stamp))
    assert FingerprintCache(tmp_path / "memo.json").path(f) != first
    fixed = tmp_path / "fixed.json"  # copied over it, as `cp -p` or rsync's rename would
    fixed.write_text('{"label": "no!"}')
    os.utime(fixed, ns=(stamp, stamp))
    os.replace(fixed, f)
    assert FingerprintCache(tmp_path / "memo.json").path(f) == "sha256:" + hashlib.sha256(b'{"label": "no!"}').hexdigest()
