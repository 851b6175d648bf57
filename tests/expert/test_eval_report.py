"""report.md and its tables: the run's row in rank order among the published results."""

import pytest

from expert.evaluation.metrics import mmlu_metrics, pubmedqa_metrics
from expert.evaluation.plots import plot_mmlu
from expert.evaluation.report import MMLU_TEST_QUESTIONS, REFERENCES, comparison_rows, markdown_tables, render_report


def pubmedqa(accuracy_of_25: int) -> dict:
    gold = ["yes"] * 25
    return pubmedqa_metrics(gold, ["yes"] * accuracy_of_25 + ["no"] * (25 - accuracy_of_25))


def test_pubmedqa_row_is_ranked_among_references():
    rows = comparison_rows(pubmedqa(19), "ours")  # 76.0%: between Galactica 77.6 and LLaMA-33B 75.6
    assert [r["rank"] for r in rows] == list(range(1, len(REFERENCES["pubmedqa"]) + 2))
    # macro-F1 by hand: 'yes' precision 19/19, recall 19/25, F1 2 * 0.76 / 1.76 = 0.864; 'no' F1 0
    # (6 predicted, none right); the authors' script averages the labels that occur: 43.2
    assert rows[4] == {"rank": 5, "model": "**ours**", "accuracy (%)": 76.0, "macro-F1 (%)": 43.2}
    assert rows[3]["model"].startswith("Galactica") and rows[5]["model"].startswith("LLaMA-33B-4bit")
    accuracies = [r["accuracy (%)"] for r in rows]
    assert accuracies == sorted(accuracies, reverse=True)
    assert comparison_rows(pubmedqa(1), "ours")[-1]["model"] == "**ours**"


def test_a_dev_split_pubmedqa_run_says_so_and_is_not_ranked_among_test_results():
    metrics = {**pubmedqa(19), "split": "dev"}
    assert [r["model"] for r in comparison_rows(metrics, "ours")] == ["**ours**"]
    text = render_report(metrics, "ours")
    assert text.startswith("# PubMedQA (zero-shot, dev split): ours") and "Galactica" not in text


def test_report_markdown_holds_the_row_in_order():
    text = render_report(pubmedqa(19), "ours", {"model": "tiny"})
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    galactica = next(i for i, line in enumerate(lines) if "Galactica" in line)
    assert lines[galactica + 1].startswith("| 5 | **ours** | 76.0 | 43.2 |")
    assert "- model: tiny" in text and "## Confusion matrix" in text


def test_mmlu_tables_and_plot(tmp_path):
    subjects = ["anatomy"] * 4 + ["philosophy"] * 4 + ["econometrics"] * 2
    categories = ["STEM"] * 4 + ["humanities"] * 4 + ["social sciences"] * 2
    gold = list("ABCDABCDAB")
    pred = list("ABCAAAAAAB")  # anatomy 3/4, philosophy 1/4, econometrics 2/2 -> 6/10
    m = {**mmlu_metrics(subjects, categories, gold, pred), "num_shots": 5}  # as the runner records it
    tables = markdown_tables(m, "ours")
    assert set(tables) == {"comparison", "summary", "categories", "subjects"}
    ranked = [r["model"] for r in tables["comparison"]]
    assert ranked.index("**ours** (n=10)") == 1  # 60.0 after LLaMA-65B 63.4, before LLaMA-33B 57.8
    assert tables["categories"][0] == {"category": "STEM", "accuracy (%)": 75.0, "questions": 4}
    path = plot_mmlu(m, tmp_path / "mmlu.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def full_mmlu(num_shots: int | None, correct_of_4: int = 2) -> dict:
    """Metrics over all of MMLU's 14,042 test questions (the size the published results have);
    `correct_of_4` right answers in every 4 (plus 2 left over, both right)."""
    n, gold = MMLU_TEST_QUESTIONS, list("ABCD") * (MMLU_TEST_QUESTIONS // 4) + ["A", "B"]
    pred = [g if i % 4 < correct_of_4 or i >= n - 2 else "D" if g != "D" else "A" for i, g in enumerate(gold)]
    m = mmlu_metrics(["anatomy"] * n, ["other"] * n, gold, pred)
    return m if num_shots is None else {**m, "num_shots": num_shots}


@pytest.mark.parametrize("num_shots, title, ours", [
    (1, "# MMLU (1-shot): ours", "**ours** (1-shot)"),
    (0, "# MMLU (0-shot): ours", "**ours** (0-shot)"),
    (None, "# MMLU (shot count not recorded): ours", "**ours** (shot count not recorded)"),  # metrics.json of old
])
def test_mmlu_report_says_its_shots_and_flags_the_5_shot_comparison(num_shots, title, ours):
    m = full_mmlu(num_shots)  # 50%
    text = render_report(m, "ours")
    assert text.startswith(title + "\n") and "5-shot" not in text.splitlines()[0]
    assert "Not like-for-like: the published results are 5-shot" in text and "test questions" not in text
    ranked = [r["model"] for r in comparison_rows(m, "ours")]
    assert ranked == ["LLaMA-65B (5-shot)", "LLaMA-33B (5-shot)", "LLaMA-33B-4bit (original project) (5-shot)",
                      ours, "LLaMA-13B (5-shot)"]


def test_mmlu_5_shot_report_on_the_full_test_set_compares_like_for_like():
    m = full_mmlu(5)
    text = render_report(m, "ours")
    assert text.startswith("# MMLU (5-shot): ours\n") and "like-for-like" not in text
    assert [r["model"] for r in comparison_rows(m, "ours")][2:4] == ["LLaMA-33B-4bit (original project)", "**ours**"]


@pytest.mark.parametrize("num_shots, ours, published", [
    (5, "**ours** (n=114)", "LLaMA-65B (n=14,042)"),
    (1, "**ours** (1-shot, n=114)", "LLaMA-65B (5-shot, n=14,042)"),
])
def test_an_mmlu_subset_is_ranked_only_with_a_caveat_naming_n(num_shots, ours, published):
    # The default preset scores 2 questions per subject: 114 of 14,042, ranked among full-MMLU
    # results. 5-shot and 57 / 114 right: standard error sqrt(0.5 * 0.5 / 114) = 4.7 points.
    m = {**mmlu_metrics(["anatomy"] * 114, ["other"] * 114, list("AB") * 57, list("A") * 114), "num_shots": num_shots}
    text = render_report(m, "ours")
    assert ("this run scored n=114 of MMLU's 14,042 test questions (eval.mmlu_subjects, eval.mmlu_max_per_subject; "
            "standard error about \u00b14.7 points) and the published results all of them, so its rank among them "
            "is indicative only.") in text
    assert ("the published results are 5-shot" in text) == (num_shots != 5)
    ranked = [r["model"] for r in comparison_rows(m, "ours")]  # the table stands alone as a Prefect artifact too
    assert ranked[0] == published and ranked[3] == ours  # 50.0: after LLaMA-33B-4bit 56.2, before LLaMA-13B 46.9


def test_mmlu_category_table_says_whose_categories_they_are():
    text = render_report(full_mmlu(5), "ours")
    categories = text[text.index("## Categories"):text.index("## Subjects")]
    assert "Categories as in the MMLU paper (hendrycks/test categories.py); lm-eval puts anatomy in STEM" in categories
    assert "lm-eval" not in render_report(pubmedqa(19), "ours")
