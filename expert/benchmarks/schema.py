"""Parquet schemas of the formatted benchmarks, and the one way this package writes them.

Every file that evaluation and training read is written here with an explicit pyarrow
schema, so a column can never silently change type (an all-empty `contexts` column would
otherwise be inferred as list<null>) and a missing or misspelled column fails at write
time instead of at read time in another stage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

_STR_LIST = pa.list_(pa.string())

# Columns every benchmark shares: the scored continuation of choice c is " " + c after prompt.
COMMON_FIELDS = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("answer", pa.string(), nullable=False),
    pa.field("choices", _STR_LIST, nullable=False),
]

PUBMEDQA_SCHEMA = pa.schema(
    COMMON_FIELDS
    + [
        pa.field("question", pa.string(), nullable=False),
        pa.field("contexts", _STR_LIST, nullable=False),  # the full contexts, even if the prompt cut them
        pa.field("truncated", pa.bool_(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # "pqa_l" or "pqa_a"
    ]
)

MMLU_SCHEMA = pa.schema(
    COMMON_FIELDS
    + [
        pa.field("subject", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=False),
        pa.field("prefix", pa.string(), nullable=False),  # header + shots; prompt == prefix + question part
        pa.field("options", _STR_LIST, nullable=False),
    ]
)


def to_table(columns: dict[str, list[Any]], schema: pa.Schema) -> pa.Table:
    """Build a table from column lists, insisting that the columns are exactly the schema's."""
    got, want = set(columns), set(schema.names)
    if got != want:
        # A programming error, not a user error: the formatter and the schema disagree.
        raise ValueError(f"columns {sorted(got)} do not match the schema's {sorted(want)}")
    return pa.Table.from_pydict({name: columns[name] for name in schema.names}, schema=schema)


def write_parquet(path: Path, columns: dict[str, list[Any]], schema: pa.Schema) -> Path:
    """Write one table in one go (fine for inputs of a few thousand rows)."""
    pq.write_table(to_table(columns, schema), path)
    return path


class ParquetSink:
    """Write a Parquet file in chunks (one row group per `write`), so big inputs are never
    held in memory at once. A file left by a failed run is removed, not left half-written."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.path, self.schema, self.rows = Path(path), schema, 0
        self._writer = pq.ParquetWriter(self.path, schema)

    def write(self, columns: dict[str, list[Any]]) -> None:
        table = to_table(columns, self.schema)
        self._writer.write_table(table)
        self.rows += table.num_rows

    def __enter__(self) -> ParquetSink:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._writer.close()
        if exc_type is not None:
            self.path.unlink(missing_ok=True)


def write_stats(out_dir: Path, stats: dict[str, Any]) -> dict[str, Any]:
    """Write `stats.json` (sorted keys, so equal stats give equal files) and return the stats."""
    (Path(out_dir) / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    return stats
