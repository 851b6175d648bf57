"""Fixtures of the evaluation tests: contract-schema Parquet files and the tiny Llama.

The Parquet files are written here directly (not through expert.benchmarks) so these
tests pin the data contract itself. Prompts are short because the tiny model's context
is 256 tokens; MMLU prefixes hold one shot instead of five, which changes nothing for
the scorer (it never counts shots).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from tests.fixtures.models import tiny_llama_dir

PUBMEDQA_QUESTIONS = [
    ("Does the treatment reduce mortality in adults?", "yes"),
    ("Is the biomarker associated with outcome in children?", "no"),
    ("Can the method improve results for the study group?", "maybe"),
    ("Does the drug lower blood pressure?", "yes"),
    ("Is the effect significant in the control group?", "no"),
    ("Do patients with chronic disease benefit?", "yes"),
    ("Is the primary outcome lower in the intervention group?", "maybe"),
]
PUBMEDQA_CONTEXTS = [
    "Patients with chronic disease were randomized to treatment or placebo in a clinical trial.",
    "Results: the primary outcome was lower in the intervention group than in the control group.",
]

MMLU_SUBJECTS = {  # subject -> category
    "college_biology": "STEM",
    "high_school_world_history": "humanities",
    "nutrition": "other",
}


def pubmedqa_frame(split: str = "test") -> pd.DataFrame:
    rows = []
    for i, (question, answer) in enumerate(PUBMEDQA_QUESTIONS):
        contexts = PUBMEDQA_CONTEXTS[: 1 + i % 2]
        prompt = "Abstract: " + "\n".join(contexts) + f"\nQuestion: {question}\nAnswer:"
        rows.append({"id": str(10000 + i), "split": split, "prompt": prompt, "answer": answer,
                     "choices": ["yes", "no", "maybe"], "question": question, "contexts": contexts,
                     "truncated": False, "source": "pqa_l"})
    return pd.DataFrame(rows)


def mmlu_frame(n_per_subject: int = 4) -> pd.DataFrame:
    rows = []
    for subject, category in MMLU_SUBJECTS.items():
        header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        prefix = header + "Which of the following is a cell?\nA. protein\nB. virus\nC. bacterium\nD. prion\nAnswer: C\n\n"
        for i in range(n_per_subject):
            options = [str(i + k) for k in range(4)]
            question = f"What is the value of {i} + {len(subject) % 5}?"
            part = question + "".join(f"\n{letter}. {o}" for letter, o in zip("ABCD", options)) + "\nAnswer:"
            rows.append({"id": f"{subject}/{i}", "split": "test", "prompt": prefix + part,
                         "answer": "ABCD"[(i + len(subject)) % 4], "choices": ["A", "B", "C", "D"],
                         "subject": subject, "category": category, "prefix": prefix, "options": options})
    return pd.DataFrame(rows)


def write_frame(frame: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False)
    return path


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny_llama"), seed=0)


@pytest.fixture(scope="session")
def loaded(llama_dir):
    from expert.evaluation.loading import load_model

    # float32: the scoring tests compare the same numbers computed in different ways, which agree
    # to ~1e-5 there; in bf16 ('auto' on a CPU with native bf16) they differ by its rounding.
    return load_model(llama_dir, device="cpu", dtype="float32")


@pytest.fixture
def pubmedqa_dir(tmp_path) -> Path:
    write_frame(pubmedqa_frame("test"), tmp_path / "pubmedqa" / "test.parquet")
    write_frame(pubmedqa_frame("dev").iloc[:3], tmp_path / "pubmedqa" / "dev.parquet")
    return tmp_path / "pubmedqa"


@pytest.fixture
def mmlu_dir(tmp_path) -> Path:
    return write_frame(mmlu_frame(), tmp_path / "mmlu" / "test.parquet").parent
