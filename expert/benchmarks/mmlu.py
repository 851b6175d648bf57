"""MMLU (Hendrycks et al., 57 subjects) formatted into k-shot Parquet.

Reads the authors' CSV layout (`data/dev` + `data/test`, or `dev/` + `test/`; no header;
columns question, A, B, C, D, answer letter) or a Hugging Face `cais/mmlu` snapshot
(`SUBJECT/dev-*.parquet`, `SUBJECT/test-*.parquet`), and writes `dev.parquet`,
`test.parquet` and `stats.json`. Test prompts carry the subject's first `num_shots` dev
questions as shots, as the authors and lm-evaluation-harness do. Dev rows are the shot pool
itself, so their prompts are zero-shot: no question ever sees its own answer.

    format_mmlu(MMLUConfig(num_shots=5), Path("mmlu/data"), Path("out"))
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, BinaryIO, Iterator, NamedTuple

import pyarrow.parquet as pq
from pydantic import Field

from expert.benchmarks.mmlu_categories import SUBJECT_CATEGORY
from expert.benchmarks.schema import MMLU_SCHEMA, ParquetSink, write_stats
from expert.config import StageConfig
from expert.errors import DataError, did_you_mean

LETTERS = ("A", "B", "C", "D")
SPLITS = ("dev", "test")
_HF_NON_SUBJECTS = {"all", "auxiliary_train"}  # folders of the cais/mmlu snapshot that are not subjects


class MMLUConfig(StageConfig):
    """How to format MMLU."""

    source: str = Field("hf:cais/mmlu", description="a folder in the authors' CSV layout or the cais/mmlu snapshot")
    num_shots: int = Field(5, ge=0, description="dev questions shown before each test question")


class Question(NamedTuple):
    question: str
    options: list[str]
    answer: str  # a letter A-D


class Subject(NamedTuple):
    name: str
    dev: Path | None
    test: Path
    kind: str  # "csv" or "parquet"


# ---------------------------------------------------------------- finding the files

def find_subjects(root: Path) -> list[Subject]:
    """The subjects under `root`, sorted by name, with their dev and test files."""
    root = Path(root)
    csv_root = next((d for d in (root / "data", root) if (d / "test").is_dir()), None)
    if csv_root is not None:
        subjects = [_csv_subject(csv_root, f) for f in sorted((csv_root / "test").glob("*_test.csv"))]
    elif root.is_dir():
        subjects = [_hf_subject(d) for d in sorted(root.iterdir()) if _is_hf_subject(d)]
    else:
        raise DataError(f"MMLU source {root} is not a folder; give the folder holding data/dev and data/test")
    if not subjects:
        raise DataError(
            f"{root} holds no MMLU subjects: expected data/test/SUBJECT_test.csv (or test/SUBJECT_test.csv) "
            "beside a dev folder, or a cais/mmlu snapshot with SUBJECT/test-*.parquet"
        )
    for subject in subjects:
        _check_subject(subject)
    return subjects


def _csv_subject(csv_root: Path, test: Path) -> Subject:
    name = test.name[: -len("_test.csv")]
    dev = csv_root / "dev" / f"{name}_dev.csv"
    return Subject(name, dev if dev.is_file() else None, test, "csv")


def _is_hf_subject(folder: Path) -> bool:
    return folder.is_dir() and folder.name not in _HF_NON_SUBJECTS and any(folder.glob("test-*.parquet"))


def _hf_subject(folder: Path) -> Subject:
    devs = sorted(folder.glob("dev-*.parquet"))
    return Subject(folder.name, devs[0] if devs else None, folder, "parquet")


def _check_subject(subject: Subject) -> None:
    if subject.name not in SUBJECT_CATEGORY:
        raise DataError(
            f"{subject.test}: unknown MMLU subject {subject.name!r}" + did_you_mean(subject.name, SUBJECT_CATEGORY)
            + "; rename or remove it (the 57 subjects are listed in expert/benchmarks/mmlu_categories.py)"
        )
    if subject.dev is None:
        raise DataError(f"{subject.test}: subject {subject.name!r} has no dev file, which holds its few-shot examples; "
                        "copy the dev folder along with the test folder")


# ---------------------------------------------------------------- reading

def read_questions(subject: Subject, split: str) -> list[Question]:
    """A subject's questions of one split, validated; errors name the file, row and field."""
    if subject.kind == "csv":
        return _read_csv(subject.dev if split == "dev" else subject.test)
    files = [subject.dev] if split == "dev" else sorted(subject.test.glob("test-*.parquet"))
    return [q for f in files for q in _read_parquet(f)]


def _read_csv(path: Path) -> list[Question]:
    out = []
    with open(path, "rb") as f:
        # The csv module, not pandas: pandas turns answer texts such as "None" or "NA" into NaN.
        reader = csv.reader(_decoded_lines(f))
        try:
            for row in reader:
                out.append(_csv_question(path, row, len(out) + 1, reader.line_num))
        except (csv.Error, UnicodeDecodeError) as exc:
            # csv.Error: line_num already counts the failing line. A decode error stops the
            # line before the reader sees it, so the failing line is the one after line_num.
            line = reader.line_num + (1 if isinstance(exc, UnicodeDecodeError) else 0)
            raise DataError(f"{path}: row {len(out) + 1} (line {line}) is not readable CSV "
                            f"({type(exc).__name__}: {exc}); restore the file from the MMLU data (UTF-8 CSV)") from None
    if not out:
        raise DataError(f"{path} holds no questions; restore it from the MMLU data")
    return out


def _decoded_lines(handle: BinaryIO) -> Iterator[str]:
    """The file's lines as text, decoded one at a time so that a bad byte is reported on its own
    line (text mode decodes 8 kB blocks ahead of the csv reader). Lines end at LF, CRLF or a lone
    CR, as in text mode with newline="", which the csv module asks for. A UTF-8 BOM (Excel's
    "CSV UTF-8") is dropped, or it would stay in the first question and reach every k-shot prompt."""
    first = True
    for block in handle:  # a binary file splits at LF only
        for raw in block.splitlines(keepends=True):
            yield raw.decode("utf-8-sig" if first else "utf-8")
            first = False


def _csv_question(path: Path, row: list[str], number: int, line: int) -> Question:
    where = f"{path}: row {number} (line {line})"
    if len(row) != 6:
        raise DataError(f"{where}: expected 6 columns (question, A, B, C, D, answer), got {len(row)}")
    if row[5].strip() not in LETTERS:
        hint = " (a header row? the original files have none)" if number == 1 else ""
        raise DataError(f"{where}: field 'answer' must be one of A, B, C, D, got {row[5]!r}{hint}")
    return Question(row[0], row[1:5], row[5].strip())


def _read_parquet(path: Path) -> list[Question]:
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError... for a damaged file
        raise DataError(f"{path} is not a readable Parquet file ({type(exc).__name__}: {exc}); "
                        "download the cais/mmlu snapshot again") from None
    missing = {"question", "choices", "answer"} - set(table.column_names)
    if missing:
        raise DataError(f"{path} lacks column(s) {sorted(missing)}; expected the cais/mmlu layout")
    out = []
    columns = (table.column(c).to_pylist() for c in ("question", "choices", "answer"))
    for i, (question, choices, answer) in enumerate(zip(*columns)):
        where = f"{path}: row {i + 1}"
        if not isinstance(question, str):
            raise DataError(f"{where}: field 'question' must be a string, got {question!r}")
        if not isinstance(choices, list) or len(choices) != 4:
            raise DataError(f"{where}: field 'choices' must list 4 answers, got {choices!r}")
        if answer not in range(4):
            raise DataError(f"{where}: field 'answer' must be an index 0-3, got {answer!r}")
        out.append(Question(question, choices, LETTERS[answer]))
    return out


# ---------------------------------------------------------------- prompts

def header(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def question_block(q: Question) -> str:
    """The question as shown, ending in "Answer:" (lm-evaluation-harness strips the question)."""
    options = "".join(f"\n{letter}. {text}" for letter, text in zip(LETTERS, q.options))
    return f"{q.question.strip()}{options}\nAnswer:"


def fewshot_prefix(subject: str, shots: list[Question]) -> str:
    return header(subject) + "".join(f"{question_block(q)} {q.answer}\n\n" for q in shots)


# ---------------------------------------------------------------- formatting

def format_mmlu(config: MMLUConfig, source: Path, out_dir: Path) -> dict:
    """Write dev/test Parquet and stats.json into `out_dir`; return the stats."""
    subjects = find_subjects(source)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_subject: dict[str, dict[str, Any]] = {}
    with ParquetSink(out_dir / "dev.parquet", MMLU_SCHEMA) as dev_sink, \
            ParquetSink(out_dir / "test.parquet", MMLU_SCHEMA) as test_sink:
        for subject in subjects:
            dev, test = read_questions(subject, "dev"), read_questions(subject, "test")
            if len(dev) < config.num_shots:
                raise DataError(f"{subject.dev}: {len(dev)} dev questions, but num_shots={config.num_shots} needs that "
                                "many; lower data.mmlu.num_shots or restore the file")
            # Dev rows are the shot pool, so they get no shots (see the module docstring).
            dev_sink.write(_columns(subject.name, "dev", dev, header(subject.name)))
            test_sink.write(_columns(subject.name, "test", test, fewshot_prefix(subject.name, dev[: config.num_shots])))
            per_subject[subject.name] = {"category": SUBJECT_CATEGORY[subject.name], "dev": len(dev), "test": len(test)}
    return write_stats(out_dir, _stats(config, per_subject))


def _columns(subject: str, split: str, questions: list[Question], prefix: str) -> dict[str, list]:
    n = len(questions)
    return {
        "id": [f"{subject}/{i}" for i in range(n)], "split": [split] * n,
        "prompt": [prefix + question_block(q) for q in questions], "answer": [q.answer for q in questions],
        "choices": [list(LETTERS)] * n, "subject": [subject] * n, "category": [SUBJECT_CATEGORY[subject]] * n,
        "prefix": [prefix] * n, "options": [list(q.options) for q in questions],
    }


def _stats(config: MMLUConfig, per_subject: dict[str, dict[str, Any]]) -> dict[str, Any]:
    categories: dict[str, dict[str, int]] = {}
    for info in per_subject.values():
        cat = categories.setdefault(info["category"], {"subjects": 0, "dev": 0, "test": 0})
        cat["subjects"] += 1
        cat["dev"] += info["dev"]
        cat["test"] += info["test"]
    return {
        "benchmark": "mmlu", "num_shots": config.num_shots, "dev_prompts": "zero-shot",
        "splits": {s: sum(info[s] for info in per_subject.values()) for s in SPLITS},
        "subjects": per_subject, "categories": categories,
    }
