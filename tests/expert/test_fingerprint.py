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
