"""Benchmarks (PubMedQA, MMLU): read the public files, write prompt/answer Parquet.

    from expert.benchmarks import get
    bench = get("pubmedqa")
    config = bench.config_class.from_dict({"fold": 0}, where="data.pubmedqa")
    stats = bench.format(config, Path("ori_pqal.json"), Path("out"))

The Parquet layout (columns, prompt format) is described in `schema.py` and each module.
"""

from expert.benchmarks.registry import Benchmark, get, names

__all__ = ["Benchmark", "get", "names"]
