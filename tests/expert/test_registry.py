"""The benchmark registry: lookup, "did you mean", and the Parquet contract every entry keeps."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from expert.benchmarks import Benchmark, get, names
from expert.benchmarks.mmlu import MMLUConfig
from expert.benchmarks.pubmedqa import PubMedQAConfig
from expert.errors import ConfigError
from tests.fixtures.data import write_mmlu_dir, write_pubmedqa_json

CASES = [
    # name, config class, choices, splits, fixture writer
    ("pubmedqa", PubMedQAConfig, ("yes", "no", "maybe"), ("train", "dev", "test"),
     lambda tmp: write_pubmedqa_json(tmp / "ori_pqal.json")),
    ("mmlu", MMLUConfig, ("A", "B", "C", "D"), ("dev", "test"), lambda tmp: write_mmlu_dir(tmp / "mmlu")),
]


def test_names():
    assert names() == ["mmlu", "pubmedqa"]


@pytest.mark.parametrize("name, config_class, choices, splits, _", CASES)
def test_entries(name, config_class, choices, splits, _):
    bench = get(name)
    assert isinstance(bench, Benchmark)
    assert (bench.name, bench.config_class, bench.choices, bench.splits) == (name, config_class, choices, splits)


@pytest.mark.parametrize("name, _c, choices, splits, write", CASES)
def test_every_benchmark_keeps_the_parquet_contract(tmp_path, name, _c, choices, splits, write):
    bench = get(name)
    stats = bench.format(bench.config_class.from_dict({}), write(tmp_path), tmp_path / "out")
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == sorted([f"{s}.parquet" for s in splits] + ["stats.json"])
    total = 0
    for split in splits:
        for row in pq.read_table(tmp_path / "out" / f"{split}.parquet").to_pylist():
            assert row["split"] == split and row["prompt"].endswith("Answer:")
            assert tuple(row["choices"]) == choices and row["answer"] in choices
            total += 1
    assert total > 0 and stats["benchmark"] == name


@pytest.mark.parametrize("name, hint", [("pubmedq", "did you mean 'pubmedqa'"), ("MMLU", "did you mean 'mmlu'")])
def test_unknown_name_suggests_the_closest(name, hint):
    with pytest.raises(KeyError, match=hint):
        get(name)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(KeyError, match="unknown benchmark 'gsm8k'; known benchmarks: mmlu, pubmedqa"):
        get("gsm8k")


@pytest.mark.parametrize("name", ["pubmedqa", "mmlu"])
def test_configs_reject_unknown_keys(name):
    with pytest.raises(ConfigError, match="unknown key 'data.x.sourc' \\(did you mean 'source'\\?\\)"):
        get(name).config_class.from_dict({"sourc": "x"}, where="data.x")
