"""Data sources: local paths, URLs (served from 127.0.0.1), errors."""

import functools
import http.server
import threading

import pytest

from expert import sources
from expert.errors import DataError
from expert.fingerprint import FingerprintCache


@pytest.fixture()
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_local_file_is_fingerprinted(tmp_path):
    f = tmp_path / "ori_pqal.json"
    f.write_text("{}")
    src = sources.fetch(str(f), tmp_path / "dl", FingerprintCache())
    assert src.path == f and src.fingerprint.startswith("sha256:")


def test_missing_local_source_names_the_path(tmp_path):
    with pytest.raises(DataError, match="nope.json.*does not exist"):
        sources.fetch(str(tmp_path / "nope.json"), tmp_path / "dl", FingerprintCache())


def test_url_download_then_revalidate_and_pick_up_changes(tmp_path, server):
    root, base = server
    (root / "ori_pqal.json").write_text('{"a": 1}')
    fp = FingerprintCache()
    first = sources.fetch(f"{base}/ori_pqal.json", tmp_path / "dl", fp)
    assert first.path.read_text() == '{"a": 1}' and first.path.name == "ori_pqal.json"
    again = sources.fetch(f"{base}/ori_pqal.json", tmp_path / "dl", fp)  # 304 Not Modified
    assert again.fingerprint == first.fingerprint
    (root / "ori_pqal.json").write_text('{"a": 2, "b": 3}')
    import os
    os.utime(root / "ori_pqal.json", (2e9, 2e9))  # newer Last-Modified
    changed = sources.fetch(f"{base}/ori_pqal.json", tmp_path / "dl", fp)
    assert changed.fingerprint != first.fingerprint


def test_url_404_is_a_clear_error(tmp_path, server):
    _, base = server
    with pytest.raises(DataError, match="HTTP 404"):
        sources.fetch(f"{base}/missing.json", tmp_path / "dl", FingerprintCache())


def test_offline_uses_the_copy_downloaded_before(tmp_path, server, monkeypatch):
    root, base = server
    (root / "d.json").write_text("{}")
    url = f"{base}/d.json"
    first = sources.fetch(url, tmp_path / "dl", FingerprintCache())
    monkeypatch.setattr(sources.time, "sleep", lambda s: None)

    def offline(*a, **k):
        raise sources.urllib.error.URLError("network unreachable")

    monkeypatch.setattr(sources.urllib.request, "urlopen", offline)
    assert sources.fetch(url, tmp_path / "dl", FingerprintCache()).path == first.path
    with pytest.raises(DataError, match="after 3 attempts"):
        sources.fetch(f"{base}/never.json", tmp_path / "dl", FingerprintCache())
