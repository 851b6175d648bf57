"""Resolve a data source string to a local file or folder, with a content fingerprint.

Sources: a local path; an http(s) URL (downloaded once into the downloads folder, then
revalidated with ETag / Last-Modified so a changed upstream file is picked up, and the
cached copy used when offline); or `hf:ORG/NAME` for a Hugging Face dataset snapshot.
The fingerprint goes into the consuming stage's cache key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from expert.atomic import write_text_atomic
from expert.errors import DataError
from expert.fingerprint import FingerprintCache
from expert.hub import check_repo_id, with_retries

log = logging.getLogger(__name__)

# Only what the formatters read is fetched from each known dataset repository.
HF_DATASET_PATTERNS = {
    "qiaojin/PubMedQA": {"allow_patterns": ["pqa_labeled/*"]},
    "cais/mmlu": {"allow_patterns": ["*/dev-*", "*/test-*"],
                  "ignore_patterns": ["all/*", "auxiliary_train/*"]},
}
DOWNLOAD_TIMEOUT_S = 60


@dataclass(frozen=True)
class LocalSource:
    source: str  # as the user wrote it
    path: Path
    fingerprint: str


def fetch(source: str, downloads: Path, fingerprints: FingerprintCache, attempts: int = 3) -> LocalSource:
    """Make `source` available locally and fingerprint its content."""
    if source.startswith(("http://", "https://")):
        path = _download(source, downloads, attempts)
        return LocalSource(source, path, fingerprints.path(path))
    if source.startswith("hf:"):
        return _hf_dataset(source, downloads, attempts)
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(
            f"data source '{source}' does not exist (resolved to {path.resolve()}). "
            "Give an existing file or folder, an http(s) URL, or hf:ORG/NAME for a Hugging Face dataset."
        )
    return LocalSource(source, path, fingerprints.path(path))


def shown_url(url: str) -> str:
    """`url` as logs, errors and meta.json show it: without user:password@ and query values, where
    signed or tokened URLs keep their secrets (the key names stay, to tell URLs apart)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    try:
        netloc += f":{parts.port}" if parts.port else ""
    except ValueError:  # a port that is not a number: show none rather than fail
        pass
    query = "&".join(f"{key}=..." if value else key
                     for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def _with_basic_auth(url: str) -> tuple[str, dict[str, str]]:
    """(the URL without user:password@, the HTTP Basic header for them): urllib would take them
    for part of the host name."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None:
        return url, {}
    credentials = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
    netloc = parts.netloc.rsplit("@", 1)[1]
    plain = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return plain, {"Authorization": "Basic " + base64.b64encode(credentials.encode()).decode()}


def _read_meta(meta_file: Path) -> dict:
    """The cached copy's validators; unreadable (torn by a full disk) means none: downloaded again."""
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _download(url: str, downloads: Path, attempts: int) -> Path:
    shown = shown_url(url)
    folder = downloads / "urls" / hashlib.sha256(url.encode()).hexdigest()[:16]
    name = _safe_name(Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name)
    target, meta_file = folder / name, folder / "meta.json"
    meta = _read_meta(meta_file) if target.is_file() else {}
    plain_url, auth = _with_basic_auth(url)
    headers = {k: v for k, v in (("If-None-Match", meta.get("etag")),
                                 ("If-Modified-Since", meta.get("last_modified"))) if v} | auth
    for attempt in range(1, attempts + 1):
        try:
            request = urllib.request.Request(plain_url, headers=headers)
            with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response:
                folder.mkdir(parents=True, exist_ok=True)
                tmp = folder / f".{name}.{os.getpid()}.part"
                with open(tmp, "wb") as out:
                    while block := response.read(1 << 20):
                        out.write(block)
                os.replace(tmp, target)
                write_text_atomic(meta_file, json.dumps({"url": shown, "etag": response.headers.get("ETag"),
                                                         "last_modified": response.headers.get("Last-Modified")}))
                return target
        except urllib.error.HTTPError as exc:
            if exc.code == 304:
                return target  # unchanged upstream: the cached copy is current
            if exc.code < 500:
                raise DataError(f"cannot download '{shown}': HTTP {exc.code} {exc.reason}. Check the URL.") from None
            error = exc
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            error = exc
        if attempt < attempts:
            time.sleep(min(2 ** attempt, 30))
    if target.is_file():
        log.warning("could not revalidate %s (%s); using the copy downloaded before", shown, error)
        return target
    raise DataError(
        f"cannot download '{shown}' after {attempts} attempts ({error}). If this machine is offline, "
        "download the file elsewhere and give its local path as the source."
    )


def _safe_name(name: str) -> str:
    """A URL's last path part as a file name that stays in its folder ("..", "" and the like do not)."""
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in name).lstrip(".")
    return name[:128] or "download"


def _hf_dataset(source: str, downloads: Path, attempts: int) -> LocalSource:
    repo_id = source[len("hf:"):]
    from huggingface_hub import snapshot_download  # deferred: only hub sources need it

    check_repo_id(repo_id, "data source", DataError)
    patterns = HF_DATASET_PATTERNS.get(repo_id, {})
    # Network failures are retried; a missing or gated dataset, or offline mode, fails at once.
    path = Path(with_retries(
        lambda: snapshot_download(repo_id=repo_id, repo_type="dataset", cache_dir=downloads / "hf", **patterns),
        f"the Hugging Face dataset '{repo_id}'", delays=tuple(min(2 ** a, 30) for a in range(1, attempts)),
        error=DataError, instead="give a local copy of the data as the source"))
    # The snapshot folder is named by the dataset commit: a content fingerprint.
    return LocalSource(source, path, f"hf-dataset:{repo_id}@{path.name}")
