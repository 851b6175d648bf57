"""The benchmarks this project formats, by name.

Each entry says how to configure and format a benchmark and what its Parquet holds (the
choices every row is scored on, the splits written). Stages look benchmarks up here rather
than importing their modules, so adding one is one entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from expert.benchmarks import mmlu, pubmedqa
from expert.config import StageConfig
from expert.errors import did_you_mean


@dataclass(frozen=True)
class Benchmark:
    name: str
    config_class: type[StageConfig]
    format: Callable[..., dict]  # format(config, source, out_dir, ...) -> stats; writes SPLIT.parquet + stats.json
    choices: tuple[str, ...]  # the continuations scored for every row, in this order
    splits: tuple[str, ...]  # the SPLIT.parquet files written


_BENCHMARKS = {
    b.name: b
    for b in (
        Benchmark("pubmedqa", pubmedqa.PubMedQAConfig, pubmedqa.format_pubmedqa, pubmedqa.LABELS, pubmedqa.SPLITS),
        Benchmark("mmlu", mmlu.MMLUConfig, mmlu.format_mmlu, mmlu.LETTERS, mmlu.SPLITS),
    )
}


def names() -> list[str]:
    """Names of the known benchmarks, sorted."""
    return sorted(_BENCHMARKS)


def get(name: str) -> Benchmark:
    """The benchmark called `name`; a KeyError that suggests the closest name otherwise."""
    try:
        return _BENCHMARKS[name]
    except KeyError:
        msg = f"unknown benchmark {name!r}" + did_you_mean(str(name).lower(), _BENCHMARKS)
        raise KeyError(f"{msg}; known benchmarks: {', '.join(names())}") from None
