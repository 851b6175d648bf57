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
