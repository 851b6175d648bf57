"""Reading PubMedQA records: the authors' ori_*.json files or the Hugging Face parquet layout.

Every record is validated as it is read, and errors name the file, the PMID and the field as
the user's file spells it. Records stream one at a time (`iter_records`), so PQA-A's 211k
questions never sit in memory together.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, NamedTuple

import pyarrow.parquet as pq

from expert.benchmarks.jsonstream import JSONStreamError, iter_object_members
from expert.errors import DataError

LABELS = ("yes", "no", "maybe")  # also the order in which the authors shuffle the labels
CHUNK_ROWS = 10_000  # parquet rows read at a time
# Field names of the two layouts, so that errors name the field as the user's file spells it.
_JSON_FIELDS = {"question": "QUESTION", "contexts": "CONTEXTS", "label": "final_decision"}
_HF_FIELDS = {"question": "question", "contexts": "context.contexts", "label": "final_decision"}
_HF_SUBDIRS = {"pqa_l": "pqa_labeled", "pqa_a": "pqa_artificial"}


class Record(NamedTuple):
    pmid: str
    question: str
    contexts: list[str]
    label: str
    source: str  # "pqa_l" or "pqa_a"


def load_records(path: Path, source: str = "pqa_l") -> list[Record]:
    """Validated records of an ori_*.json file or an HF parquet folder, in stored order
    (the order matters: the official split depends on it). A JSON file is checked to be valid
    JSON as a whole before any record is, as `json.load` would."""
    path = _existing(path, source)
    if _is_parquet(path):
        return list(_records_from_parquet(path, source))
    return [_check(path, pmid, rec, _JSON_FIELDS, source) for pmid, rec in list(_json_members(path))]


def iter_records(path: Path, source: str = "pqa_l") -> Iterator[Record]:
    """Like `load_records`, one record at a time: a file of any size is read in constant memory."""
    path = _existing(path, source)
    if _is_parquet(path):
        return _records_from_parquet(path, source)
    return (_check(path, pmid, rec, _JSON_FIELDS, source) for pmid, rec in _json_members(path))


def _existing(path: Path, source: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise DataError(f"PubMedQA source {path} does not exist; give ori_pqal.json "
                        f"or a folder with {_HF_SUBDIRS[source]}/*.parquet")
    return path


def _is_parquet(path: Path) -> bool:
    return path.is_dir() or path.suffix == ".parquet"


def _json_members(path: Path) -> Iterator[tuple[str, Any]]:
    first = _first_char(path)
    if not first:
        raise DataError(f"{path} is empty; re-download ori_pqal.json (a JSON object keyed by PMID)")
    if first != "{":
        raise DataError(f"{path} must be a non-empty JSON object keyed by PMID, like the authors' ori_pqal.json")
    count = 0
    try:
        for member in iter_object_members(path):
            count += 1
            yield member
    except (JSONStreamError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); re-download it") from None
    if not count:
        raise DataError(f"{path} must be a non-empty JSON object keyed by PMID, like the authors' ori_pqal.json")


def _first_char(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(4096)
    return head.removeprefix(b"\xef\xbb\xbf").lstrip(b" \t\r\n")[:1].decode("latin-1")


def _records_from_parquet(path: Path, source: str) -> Iterator[Record]:
    subdir = _HF_SUBDIRS[source]
    files = [path] if path.is_file() else sorted(path.glob(f"{subdir}/*.parquet")) or sorted(path.glob("*.parquet"))
    if not files:
        raise DataError(f"{path} holds no {subdir}/*.parquet; give the qiaojin/PubMedQA snapshot folder or ori_pqal.json")
    seen = set()
    for file in files:
        for pubid, question, ctx, label in _parquet_rows(file, subdir):
            fields = {"question": question, "context.contexts": ctx, "final_decision": label}
            rec = _check(file, str(pubid), fields, _HF_FIELDS, source)
            if rec.pmid in seen:
                raise DataError(f"{file}: PMID {rec.pmid} appears twice; remove the duplicate")
            seen.add(rec.pmid)
            yield rec


def _parquet_rows(file: Path, subdir: str) -> Iterator[tuple]:
    """(pubid, question, contexts, label) of each row, read a batch at a time."""
    try:
        reader = pq.ParquetFile(file)
        names = reader.schema_arrow.names
        missing = {"pubid", "question", "context", "final_decision"} - set(names)
        if missing:
            raise DataError(f"{file} lacks column(s) {sorted(missing)}; expected the qiaojin/PubMedQA {subdir} layout")
        for batch in reader.iter_batches(CHUNK_ROWS, columns=["pubid", "question", "context", "final_decision"]):
            contexts = batch.column("context").field("contexts").to_pylist()
            yield from zip(batch.column("pubid").to_pylist(), batch.column("question").to_pylist(), contexts,
                           batch.column("final_decision").to_pylist())
    except DataError:
        raise
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, KeyError... for a damaged file
        raise DataError(f"{file} is not a readable Parquet file of the {subdir} layout "
                        f"({type(exc).__name__}: {exc}); download it again") from None


def _check(path: Path, pmid: str, rec: Any, names: dict[str, str], source: str) -> Record:
    """One record, validated; the error names the file, the PMID and the field."""
    where = f"{path}: record PMID {pmid}"
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected an object with {', '.join(names.values())}, got {type(rec).__name__}")
    question, contexts, label = (rec.get(names[k]) for k in ("question", "contexts", "label"))
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: field '{names['question']}' must be a non-empty string, got {question!r}")
    if not isinstance(contexts, list) or not contexts or not all(isinstance(c, str) for c in contexts):
        raise DataError(
            f"{where}: field '{names['contexts']}' must be a non-empty list of strings, got {_short(contexts)}")
    if label not in LABELS:
        raise DataError(f"{where}: field '{names['label']}' must be one of {', '.join(LABELS)}, got {label!r}")
    return Record(pmid, question, contexts, label, source)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 80 else text[:77] + "..."
