"""Data sources: local paths, URLs (served from 127.0.0.1), errors."""

import functools
import http.server
import threading

import pytest

from expert import sources
from expert.errors import DataError
from expert.fingerprint import FingerprintCache


class _LoggingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder and records each answer (status code, the request's conditional headers)."""

    answers: list = []

    def log_request(self, code="-", size="-"):
        self.answers.append((int(code), self.headers.get("If-Modified-Since"), self.headers.get("If-None-Match")))

    def log_message(self, *args):
        pass


@pytest.fixture()
def server(tmp_path):
    """(folder, base URL) of a local HTTP server; `server_answers` lists what it answered."""
    root = tmp_path / "www"
    root.mkdir()
    _LoggingHandler.answers = []
    handler = functools.partial(_LoggingHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_a_torn_meta_file_means_downloading_again(tmp_path, server):
    """A full disk can leave meta.json half-written: the next fetch must not crash on it."""
    root, base = server
    (root / "ori_pqal.json").write_text('{"a": 1}')
    first = sources.fetch(f"{base}/ori_pqal.json", tmp_path / "dl", FingerprintCache())
    meta = next((tmp_path / "dl").rglob("meta.json"))
    meta.write_text('{"url": "http://127.0.0.1/ori_pq')
    again = sources.fetch(f"{base}/ori_pqal.json", tmp_path / "dl", FingerprintCache())
    assert again.fingerprint == first.fingerprint and [code for code, *_ in _LoggingHandler.answers] == [200, 200]
    assert meta.read_text().startswith("{") and '"last_modified"' in meta.read_text()  # whole again
    assert sorted(p.name for p in meta.parent.iterdir()) == ["meta.json", "ori_pqal.json"]


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
    again = sources.fetch(f"{base}/ori_pqal.json", tmp_path / "dl", fp)
    assert again.fingerprint == first.fingerprint
    # the second fetch asked with the first answer's Last-Modified and was not sent the file again
    (code1, since1, _), (code2, since2, _) = _LoggingHandler.answers
    assert (code1, since1, code2) == (200, None, 304) and since2, _LoggingHandler.answers
    (root / "ori_pqal.json").write_text('{"a": 2, "b": 3}')
    import os
    os.utime(root / "ori_pqal.json", (2e9, 2e9))  # newer Last-Modified
    changed = sources.fetch(f"{base}/ori_pqal.json", tmp_path / "dl", fp)
    assert changed.fingerprint != first.fingerprint
    assert changed.path.read_text() == '{"a": 2, "b": 3}' and _LoggingHandler.answers[-1][0] == 200


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


SECRET = "sig0PLANTEDsecretDoNotLeak"


def test_a_url_secret_reaches_no_file_log_or_error(tmp_path, server, caplog, monkeypatch):
    """Signed URLs carry their credentials in the query: downloads work with them, but meta.json,
    the log and error messages show the URL without its query values."""
    root, base = server
    (root / "d.json").write_text("{}")
    downloads = tmp_path / "dl"
    got = sources.fetch(f"{base}/d.json?X-Amz-Signature={SECRET}&raw", downloads, FingerprintCache())
    assert got.path.read_text() == "{}"
    meta = next(downloads.rglob("meta.json")).read_text()
    assert SECRET not in meta and "X-Amz-Signature=...&raw" in meta
    with pytest.raises(DataError, match=r"HTTP 404") as error:
        sources.fetch(f"{base}/missing.json?token={SECRET}", downloads, FingerprintCache())
    assert SECRET not in str(error.value) and "missing.json?token=..." in str(error.value)

    monkeypatch.setattr(sources.time, "sleep", lambda s: None)
    monkeypatch.setattr(sources.urllib.request, "urlopen",
                        lambda *a, **k: (_ for _ in ()).throw(sources.urllib.error.URLError("unreachable")))
    with caplog.at_level("WARNING", logger="expert"):
        sources.fetch(f"{base}/d.json?X-Amz-Signature={SECRET}&raw", downloads, FingerprintCache())
    assert "could not revalidate" in caplog.text and SECRET not in caplog.text
    with pytest.raises(DataError, match="after 3 attempts") as error:
        sources.fetch(f"{base}/never.json?token={SECRET}", downloads, FingerprintCache())
    assert SECRET not in str(error.value)
    files = [p for p in downloads.rglob("*") if p.is_file()]
    assert not [p for p in files if SECRET.encode() in p.read_bytes()]


def test_shown_url_drops_userinfo_and_query_values():
    shown = sources.shown_url(f"https://user:{SECRET}@example.org:8443/a/b.json?token={SECRET}&x=1#frag")
    assert shown == "https://example.org:8443/a/b.json?token=...&x=..."
    assert sources.shown_url("http://[::1]:8000/f.json") == "http://[::1]:8000/f.json"


def test_user_and_password_in_a_url_are_sent_as_basic_auth(tmp_path):
    """https://user:password@host/file: urllib alone takes them for part of the host; they go in
    an Authorization header, and nowhere else."""
    import base64

    seen = []

    class Private(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            if self.headers.get("Authorization") != "Basic " + base64.b64encode(f"me:{SECRET}@x".encode()).decode():
                self.send_response(401)
                self.end_headers()
                return
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"ok": 1}')

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Private)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        port = httpd.server_address[1]
        got = sources.fetch(f"http://me:{SECRET}%40x@127.0.0.1:{port}/p.json", tmp_path / "dl", FingerprintCache())
        assert got.path.read_text() == '{"ok": 1}' and len(seen) == 1
        with pytest.raises(DataError, match="HTTP 401") as error:
            sources.fetch(f"http://me:wrong@127.0.0.1:{port}/q.json", tmp_path / "dl", FingerprintCache())
        assert "wrong" not in str(error.value)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert not [p for p in (tmp_path / "dl").rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]


def test_hub_dataset_retries_network_errors_and_not_a_missing_dataset(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    calls, answers = [], [ConnectionError("reset"), str(tmp_path / "snap" / "abc123")]

    def fake_snapshot(repo_id, repo_type, cache_dir, **patterns):
        calls.append((repo_id, repo_type, cache_dir, patterns))
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.setattr(sources.time, "sleep", lambda s: None)
    monkeypatch.setattr("expert.hub.time.sleep", lambda s: None)
    got = sources.fetch("hf:cais/mmlu", tmp_path / "dl", FingerprintCache())
    assert got.fingerprint == "hf-dataset:cais/mmlu@abc123" and len(calls) == 2
    assert calls[0][:3] == ("cais/mmlu", "dataset", tmp_path / "dl" / "hf")
    assert calls[0][3] == sources.HF_DATASET_PATTERNS["cais/mmlu"]  # only the files the formatter reads

    calls.clear()
    import httpx

    missing = httpx.Response(404, request=httpx.Request("GET", "https://huggingface.co/api/datasets/org/nope"))
    answers[:] = [RepositoryNotFoundError("404 no such dataset", response=missing)] * 3
    with pytest.raises(DataError, match="cannot fetch the Hugging Face dataset 'org/nope': RepositoryNotFoundError"):
        sources.fetch("hf:org/nope", tmp_path / "dl", FingerprintCache())
    assert len(calls) == 1  # final at once, not retried as a network failure
