"""Write bench/data/pubmedqa_lengths.json: the real token lengths the GPU benchmark trains and scores on.

    .venv/bin/python bench/data/lengths.py --model SMOLLM2_135M_INSTRUCT_DIR --data ../shared/data

- "pubmedqa_train": tokens of each PubMedQA training example (fold 0, 450 questions) as the
  training stage builds it (lm-eval prompt, cut to 512 tokens by the format stage as the GPU
  presets do, + " answer" + EOS), and "pubmedqa_answer" the answer + EOS tokens of each;
- "mmlu": per subject, the 5-shot prefix's tokens and each test question's own tokens after it.
Lengths are SmolLM2-135M-Instruct tokenizer counts; the GPU benchmark uses them with random token
ids (random-weight models), so only the shapes matter.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--out", default=str(ROOT / "bench/data/pubmedqa_lengths.json"))
    args = p.parse_args()
    from transformers import AutoTokenizer

    from expert.benchmarks.mmlu import MMLUConfig, format_mmlu
    from expert.benchmarks.pubmedqa import PubMedQAConfig, format_pubmedqa
    from expert.evaluation.scoring import encode_questions
    from expert.train.data import encode_split, read_split

    tok = AutoTokenizer.from_pretrained(args.model)
    data = Path(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        format_pubmedqa(PubMedQAConfig(fold=0, max_prompt_tokens=512), data / "pubmedqa" / "ori_pqal.json",
                        Path(tmp) / "pubmedqa", tokenizer=tok)
        train = encode_split(tok, read_split(Path(tmp) / "pubmedqa" / "train.parquet"), 512)
        format_mmlu(MMLUConfig(), data / "mmlu" / "data", Path(tmp) / "mmlu")
        import pyarrow.parquet as pq

        mmlu = pq.read_table(Path(tmp) / "mmlu" / "test.parquet").to_pydict()
    subjects: dict[str, dict] = {}
    questions = encode_questions(tok, mmlu["prompt"], mmlu["choices"])
    for subject, prefix, q in zip(mmlu["subject"], mmlu["prefix"], questions):
        entry = subjects.setdefault(subject, {"prefix": None, "questions": []})
        if entry["prefix"] is None:
            entry["prefix"] = len(tok(prefix.rstrip())["input_ids"])
        entry["questions"].append(len(q.context) - entry["prefix"])
    out = {"tokenizer": "SmolLM2-135M-Instruct",
           "pubmedqa_train": train.lengths,
           "pubmedqa_answer": [sum(label != -100 for label in e.labels) for e in train.examples],
           "mmlu": subjects}
    Path(args.out).write_text(json.dumps(out, separators=(",", ":")) + "\n")
    lengths = train.lengths
    print(f"pubmedqa: {len(lengths)} examples, mean {sum(lengths) / len(lengths):.0f} tokens, "
          f"max {max(lengths)}; mmlu: {len(subjects)} subjects, {len(questions)} questions")


if __name__ == "__main__":
    main()
