"""MMLU formatting: k-shot prompts, categories, the three input layouts, bad input."""

from __future__ import annotations

import csv
import io
import json
import shutil
from collections import Counter

import pyarrow.parquet as pq
import pytest

from expert.benchmarks.mmlu import MMLUConfig, format_mmlu
from expert.benchmarks.mmlu_categories import CATEGORIES, SUBCATEGORIES, SUBJECT_CATEGORY
from expert.benchmarks.schema import MMLU_SCHEMA
from expert.errors import ConfigError, DataError
from tests.fixtures.data import mmlu_rows, write_mmlu_dir, write_mmlu_hf


def rows(out, split):
    return pq.read_table(out / f"{split}.parquet").to_pylist()


def test_one_shot_prompt_written_out_by_hand(tmp_path):
    src = write_mmlu_dir(tmp_path / "mmlu", subjects=("high_school_us_history",), n_test=1)
    format_mmlu(MMLUConfig(num_shots=1), src, tmp_path / "out")
    [row] = rows(tmp_path / "out", "test")
    h = "high_school_us_history"
    assert row["prompt"] == (
        "The following are multiple choice questions (with answers) about high school us history.\n\n"
        f'dev question 0 about {h}, with "quotes"?\n'
        f"A. {h} option 0A\nB. {h} option 0B\nC. {h} option 0C\nD. None\nAnswer: A\n\n"
        f'test question 0 about {h}, with "quotes"?\n'
        f"A. {h} option 0A\nB. {h} option 0B\nC. {h} option 0C\nD. None\nAnswer:"
    )
    assert (row["id"], row["answer"], row["category"]) == (f"{h}/0", "A", "humanities")
    assert row["choices"] == ["A", "B", "C", "D"]
    assert row["options"] == [f"{h} option 0A", f"{h} option 0B", f"{h} option 0C", "None"]  # "None" stays a string


def test_rows_prefixes_and_stats(tmp_path):
    src = write_mmlu_dir(tmp_path / "mmlu", n_test=6)
    stats = format_mmlu(MMLUConfig(), src, tmp_path / "out")
    test, dev = rows(tmp_path / "out", "test"), rows(tmp_path / "out", "dev")
    assert pq.read_schema(tmp_path / "out" / "test.parquet").equals(MMLU_SCHEMA)
    assert [r["id"] for r in test] == [f"{s}/{i}" for s in ("abstract_algebra", "anatomy") for i in range(6)]
    for row in test:
        assert row["prompt"].startswith(row["prefix"]) and row["prompt"].endswith("\nAnswer:")
        assert row["prefix"].count("\nAnswer: ") == 5 and "test question" not in row["prefix"]
        assert row["answer"] == "ABCD"[int(row["id"].split("/")[1]) % 4]
    assert len({r["prefix"] for r in test if r["subject"] == "anatomy"}) == 1
    assert {r["subject"]: r["category"] for r in test} == {"anatomy": "other", "abstract_algebra": "STEM"}
    # dev rows are the shot pool: zero-shot, never shown their own answer
    assert all(r["prefix"].count("Answer:") == 0 and r["prompt"].count("Answer:") == 1 for r in dev)
    assert stats["splits"] == {"dev": 10, "test": 12}
    assert stats["subjects"]["anatomy"] == {"category": "other", "dev": 5, "test": 6}
    one = {"subjects": 1, "dev": 5, "test": 6}
    assert stats["categories"] == {"other": one, "STEM": one}
    assert json.loads((tmp_path / "out" / "stats.json").read_text()) == stats


def test_zero_shots_is_the_header_alone(tmp_path):
    format_mmlu(MMLUConfig(num_shots=0), write_mmlu_dir(tmp_path / "m"), tmp_path / "out")
    assert {r["prefix"] for r in rows(tmp_path / "out", "test") if r["subject"] == "anatomy"} == {
        "The following are multiple choice questions (with answers) about anatomy.\n\n"}


def test_all_layouts_give_the_same_files(tmp_path):
    flat = write_mmlu_dir(tmp_path / "flat")
    nested = tmp_path / "nested"
    shutil.copytree(flat, nested / "data")
    (nested / "data" / "val").mkdir()  # the authors' tarball also has val/ and auxiliary_train/
    hf = write_mmlu_hf(tmp_path / "hf")
    (hf / "auxiliary_train").mkdir()
    outs = []
    for i, src in enumerate((flat, nested, hf)):
        format_mmlu(MMLUConfig(), src, tmp_path / f"out{i}")
        outs.append([rows(tmp_path / f"out{i}", s) for s in ("dev", "test")])
    assert outs[0] == outs[1] == outs[2]


def test_category_table_matches_the_authors():
    assert len(SUBJECT_CATEGORY) == 57
    assert Counter(SUBJECT_CATEGORY.values()) == {"STEM": 18, "humanities": 13, "social sciences": 12, "other": 14}
    assert sorted(s for subs in CATEGORIES.values() for s in subs) == sorted(set(SUBCATEGORIES.values()))
    assert [SUBJECT_CATEGORY[s] for s in ("anatomy", "college_medicine", "econometrics", "formal_logic")] == [
        "other", "other", "social sciences", "humanities"]


# ---------------------------------------------------------------- bad input

def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)


def with_test_rows(root, edit):
    test_rows = mmlu_rows("anatomy", "test", 4)
    edit(test_rows)
    write_csv(root / "test" / "anatomy_test.csv", test_rows)


@pytest.mark.parametrize("edit, message", [
    (lambda r: r[2].pop(), r"anatomy_test.csv: row 3 \(line 6\): expected 6 columns"),  # each question spans 2 lines
    (lambda r: r[1].append("extra"), r"anatomy_test.csv: row 2 .*expected 6 columns .* got 7"),
    (lambda r: r[3].__setitem__(5, "E"), r"anatomy_test.csv: row 4 .*'answer' must be one of A, B, C, D, got 'E'"),
    (lambda r: r.insert(0, ["question", "A", "B", "C", "D", "answer"]), r"row 1 .*got 'answer' \(a header row"),
    (lambda r: r.clear(), r"anatomy_test.csv holds no questions"),
])
def test_bad_csv_names_file_row_and_field(tmp_path, edit, message):
    root = write_mmlu_dir(tmp_path / "m")
    with_test_rows(root, edit)
    with pytest.raises(DataError, match=message):
        format_mmlu(MMLUConfig(), root, tmp_path / "out")


def csv_bytes(rows):
    buffer = io.StringIO(newline="")
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue().encode()


# Each fixture question spans two lines, so row 2 starts on line 3 and its options sit on line 4.
@pytest.mark.parametrize("field, bad, message", [
    (0, b"\xff", r"row 2 \(line 3\) is not readable CSV \(UnicodeDecodeError"),
    (1, b"\xff", r"row 2 \(line 4\) is not readable CSV \(UnicodeDecodeError"),  # inside a quoted multi-line field
    (0, b"x" * 200_000, r"row 2 \(line 3\) is not readable CSV \(Error: field larger than field limit"),
])
def test_unreadable_csv_names_the_line_it_is_on(tmp_path, field, bad, message):
    root = write_mmlu_dir(tmp_path / "m")
    test_rows = mmlu_rows("anatomy", "test", 4)
    test_rows[1][field] = "BAD" + test_rows[1][field]
    (root / "test" / "anatomy_test.csv").write_bytes(csv_bytes(test_rows).replace(b"BAD", bad))
    with pytest.raises(DataError, match=f"anatomy_test.csv: {message}"):
        format_mmlu(MMLUConfig(), root, tmp_path / "out")


@pytest.mark.parametrize("rewrite", [
    lambda data: "\ufeff".encode() + data,  # Excel's "CSV UTF-8" starts with a byte-order mark
    lambda data: data.replace(b"\r\n", b"\r"),  # old Mac line ends: text mode with newline="" reads them
])
def test_bom_and_line_ends_change_no_prompt(tmp_path, rewrite):
    plain = write_mmlu_dir(tmp_path / "plain")
    edited = write_mmlu_dir(tmp_path / "edited")
    for path in [*edited.glob("*/*.csv")]:
        path.write_bytes(rewrite(path.read_bytes()))
    format_mmlu(MMLUConfig(), plain, tmp_path / "out_plain")
    format_mmlu(MMLUConfig(), edited, tmp_path / "out_edited")
    for split in ("dev", "test"):
        assert rows(tmp_path / "out_edited", split) == rows(tmp_path / "out_plain", split)
    assert not any("\ufeff" in r["prompt"] for r in rows(tmp_path / "out_edited", "test"))


def test_empty_or_missing_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no MMLU subjects"):
        format_mmlu(MMLUConfig(), tmp_path / "empty", tmp_path / "out")
    with pytest.raises(DataError, match="not a folder"):
        format_mmlu(MMLUConfig(), tmp_path / "nowhere", tmp_path / "out")


def test_subject_without_dev_file(tmp_path):
    root = write_mmlu_dir(tmp_path / "m")
    (root / "dev" / "anatomy_dev.csv").unlink()
    with pytest.raises(DataError, match="anatomy_test.csv: subject 'anatomy' has no dev file"):
        format_mmlu(MMLUConfig(), root, tmp_path / "out")


def test_too_few_dev_rows_for_the_shots(tmp_path):
    root = write_mmlu_dir(tmp_path / "m", n_dev=3)
    with pytest.raises(DataError, match="abstract_algebra_dev.csv: 3 dev questions, but num_shots=5"):
        format_mmlu(MMLUConfig(), root, tmp_path / "out")
    format_mmlu(MMLUConfig(num_shots=3), root, tmp_path / "out")  # enough for 3 shots


def test_unknown_subject(tmp_path):
    root = write_mmlu_dir(tmp_path / "m", subjects=("anatomy", "anatomyy"))
    with pytest.raises(DataError, match=r"anatomyy_test.csv: unknown MMLU subject 'anatomyy' \(did you mean 'anatomy'\?\)"):
        format_mmlu(MMLUConfig(), root, tmp_path / "out")


@pytest.mark.parametrize("column, value, message", [
    ("answer", 4, "row 2: field 'answer' must be an index 0-3, got 4"),
    ("choices", ["a", "b", "c"], "row 2: field 'choices' must list 4 answers"),
])
def test_bad_hf_parquet(tmp_path, column, value, message):
    root = write_mmlu_hf(tmp_path / "hf", subjects=("anatomy",))
    path = root / "anatomy" / "test-00000-of-00001.parquet"
    table = pq.read_table(path).to_pydict()
    table[column][1] = value
    pq.write_table(pq.read_table(path).from_pydict(table), path)
    with pytest.raises(DataError, match=f"test-00000-of-00001.parquet: {message}"):
        format_mmlu(MMLUConfig(), root, tmp_path / "out")


def test_negative_shots_is_a_config_error():
    with pytest.raises(ConfigError, match="'data.mmlu.num_shots'"):
        MMLUConfig.from_dict({"num_shots": -1}, where="data.mmlu")
