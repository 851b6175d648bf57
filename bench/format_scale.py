"""PubMedQA formatting at PQA-A scale: peak memory and time, streaming vs `json.load`.

PQA-A (`ori_pqaa.json`) holds 211k machine-labelled questions in one JSON object of a few
hundred MB. This script writes a synthetic file of that shape (records like the authors', with
every field, ~1 KB each) into a temporary folder, then formats PQA-L (1,000 synthetic records)
+ that PQA-A as extra training data two ways, each in its own process so peak RSS is its own:

  ours:  expert.benchmarks.pubmedqa.format_pubmedqa (streams the file, writes train in chunks)
  peer:  the naive path, the one this project used before: json.load the whole file, validate
         every record into a list, render all prompts, write train.parquet in one table

It checks that both write the same rows, and writes bench/results/format_scale.json.

    .venv/bin/python bench/format_scale.py            # 1k and 211k PQA-A questions
    .venv/bin/python bench/format_scale.py --sizes 1000,20000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORDS = ("patients cohort treatment randomized trial outcome mortality biomarker association clinical study "
         "results significant analysis group control risk factor disease therapy baseline follow-up").split()


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)).capitalize() + "."


def _record(rng: random.Random, label: str) -> dict:
    sections = rng.randint(2, 4)
    return {
        "QUESTION": _text(rng, 12)[:-1] + "?",
        "CONTEXTS": [_text(rng, rng.randint(20, 35)) for _ in range(sections)],
        "LABELS": ["BACKGROUND", "METHODS", "RESULTS", "CONCLUSIONS"][:sections],
        "MESHES": ["Humans", "Adult", "Cohort Studies"],
        "YEAR": str(rng.randint(1990, 2018)),
        "reasoning_required_pred": label,
        "reasoning_free_pred": label,
        "final_decision": label,
        "LONG_ANSWER": _text(rng, 30),
    }


def write_dataset(path: Path, n: int, first_pmid: int, seed: int) -> Path:
    """An ori_*.json-shaped file of `n` records, written record by record (never all in memory)."""
    rng = random.Random(seed)
    labels = ("yes", "no", "maybe")
    with open(path, "w") as f:
        f.write("{")
        for i in range(n):
            f.write(("," if i else "") + json.dumps(str(first_pmid + i)) + ": ")
            f.write(json.dumps(_record(rng, labels[i % 3] if first_pmid < 20_000_000 else labels[i % 2])))
        f.write("}")
    return path


def naive_format(pqal: Path, pqaa: Path, out: Path) -> None:
    """The peer: the whole file through json.loads, every record and prompt in lists, one write."""
    from expert.benchmarks.pubmedqa import PubMedQAConfig, _columns, official_split
    from expert.benchmarks.pubmedqa_records import _JSON_FIELDS, _check
    from expert.benchmarks.schema import PUBMEDQA_SCHEMA, write_parquet

    config = PubMedQAConfig(extra_train_source=str(pqaa))
    records = [_check(pqal, k, v, _JSON_FIELDS, "pqa_l") for k, v in json.loads(pqal.read_bytes()).items()]
    splits = official_split(records, config.fold)
    known = {r.pmid for r in records}
    extra = [_check(pqaa, k, v, _JSON_FIELDS, "pqa_a") for k, v in json.loads(pqaa.read_bytes()).items()]
    splits["train"] += [r for r in extra if r.pmid not in known]
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        write_parquet(out / f"{name}.parquet", _columns(name, rows, config, None), PUBMEDQA_SCHEMA)


def ours_format(pqal: Path, pqaa: Path, out: Path) -> None:
    from expert.benchmarks.pubmedqa import PubMedQAConfig, format_pubmedqa

    format_pubmedqa(PubMedQAConfig(extra_train_source=str(pqaa)), pqal, out, extra_source=pqaa)


def child(args: argparse.Namespace) -> None:
    """Run one formatter in this process; print seconds and peak RSS (MiB) as JSON."""
    import pyarrow  # noqa: F401  (imported before the clock and the baseline: both sides pay it)

    from expert.benchmarks import pubmedqa  # noqa: F401

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    (ours_format if args.child == "ours" else naive_format)(Path(args.pqal), Path(args.pqaa), Path(args.out))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"seconds": round(seconds, 2), "peak_rss_mib": round(peak, 1),
                      "rss_after_imports_mib": round(base, 1)}))


def run_one(which: str, pqal: Path, pqaa: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", which, "--pqal", str(pqal), "--pqaa", str(pqaa), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"{which} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def same_rows(a: Path, b: Path) -> bool:
    """Compared in a child process: this one must stay small, as children inherit its peak RSS
    as the floor of their own (Linux keeps ru_maxrss across fork + exec)."""
    code = ("import sys, pyarrow.parquet as pq; a, b = sys.argv[1:]; print(all(pq.read_table(f'{a}/{s}.parquet')"
            ".equals(pq.read_table(f'{b}/{s}.parquet')) for s in ('train', 'dev', 'test')))")
    done = subprocess.run([sys.executable, "-c", code, str(a), str(b)], capture_output=True, text=True, check=True)
    return done.stdout.strip() == "True"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,211269", help="PQA-A question counts to measure")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "format_scale.json")
    parser.add_argument("--child", choices=["ours", "peer"], help=argparse.SUPPRESS)
    parser.add_argument("--pqal", help=argparse.SUPPRESS)
    parser.add_argument("--pqaa", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # --out is then the folder to format into
        child(args)
        return
    scaling = []
    with tempfile.TemporaryDirectory(prefix="format-scale-") as tmp:
        tmp = Path(tmp)
        pqal = write_dataset(tmp / "ori_pqal.json", 1000, 10_000_000, seed=0)
        for n in [int(x) for x in args.sizes.split(",")]:
            pqaa = write_dataset(tmp / f"ori_pqaa_{n}.json", n, 20_000_000, seed=1)
            row = {"pqa_a_questions": n, "file_mb": round(pqaa.stat().st_size / 2**20, 1)}
            for which in ("ours", "peer"):
                row[which] = run_one(which, pqal, pqaa, tmp / f"{which}-{n}")
            row["identical_rows"] = same_rows(tmp / f"ours-{n}", tmp / f"peer-{n}")
            print(json.dumps(row), flush=True)
            scaling.append(row)
            pqaa.unlink()
    write_result(args, scaling)


def write_result(args: argparse.Namespace, scaling: list[dict]) -> None:
    import pyarrow  # only now: the parent stays small while children run (see same_rows)

    big = scaling[-1]
    result = {
        "metric": f"peak RSS formatting PubMedQA PQA-L 1k + PQA-A {big['pqa_a_questions']} questions "
                  f"({big['file_mb']} MB JSON) to Parquet",
        "unit": "MiB",
        "peer": {"name": "json.load of the whole file, records and prompts in lists, one Parquet write "
                         "(this project's previous path)", "value": big["peer"]["peak_rss_mib"]},
        "ours": {"value": big["ours"]["peak_rss_mib"]},
        "ratio": round(big["peer"]["peak_rss_mib"] / big["ours"]["peak_rss_mib"], 2),
        "time_s": {"peer": big["peer"]["seconds"], "ours": big["ours"]["seconds"],
                   "ratio": round(big["peer"]["seconds"] / big["ours"]["seconds"], 2)},
        "quality": {"identical_rows": all(r["identical_rows"] for r in scaling)},
        "scaling": scaling,
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the end (shared)",
        "versions": {"python": platform.python_version(), "pyarrow": pyarrow.__version__},
        "command": "python bench/format_scale.py --sizes " + args.sizes,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
