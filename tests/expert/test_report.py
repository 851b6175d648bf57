"""The pipeline report: summary.json shape, nested details flattened, dev scores per checkpoint, MMLU caveats."""

import json

from expert.report import inline_images, write_pipeline_report


def artifact(root, name, files, seconds=1.5):
    folder = root / name.replace("/", "_")
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"timings": {"seconds": seconds}}))
    for fname, value in files.items():
        (folder / fname).write_text(json.dumps(value))
    return folder


def test_report_compares_runs_and_shows_stage_details(tmp_path):
    pubmedqa = {"accuracy": 0.5, "macro_f1": 0.4, "n": 500}
    mmlu = {"average": 0.3, "subject_mean": 0.28, "n": 114, "categories": {"STEM": 0.25}}
    upstream = {
        "pubmedqa/base": artifact(tmp_path, "pubmedqa/base", {"metrics.json": pubmedqa}),
        "pubmedqa/expert": artifact(tmp_path, "pubmedqa/expert", {"metrics.json": {**pubmedqa, "accuracy": 0.8}}),
        "mmlu/base": artifact(tmp_path, "mmlu/base", {"metrics.json": mmlu}),
        "mmlu/expert": artifact(tmp_path, "mmlu/expert", {"metrics.json": {**mmlu, "average": 0.2}}),
        "quantize": artifact(tmp_path, "quantize", {"quantization_report.json": {
            "perplexity": {"unquantized": 17.3499, "quantized": 20.8949}, "layers": [{"layer": "q"}]}}, 152.2),
        "select": artifact(tmp_path, "select", {"selection.json": {"metric": "accuracy", "step": 4},
                                                "scores.json": [{"step": 4, "accuracy": 0.4}, {"step": 8, "accuracy": 0.4}]}),
    }
    out = tmp_path / "out"
    out.mkdir()
    headline = write_pipeline_report(upstream, {"name": "t", "model": {"source": "m"}}, out)

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["pubmedqa"]) == {"base", "expert"} and summary["timings_s"]["quantize"] == 152.2
    assert headline["pubmedqa"]["expert"]["accuracy"] == 0.8
    report = (out / "report.md").read_text()
    assert "| perplexity.quantized | 20.89 |" in report  # nested details, rounded
    assert "layers" not in report  # lists are not dumped into the key/value table
    assert "| 8 | 0.4 |" in report  # dev score of every checkpoint
    assert report.index("**expert**") < report.index("GPT-4") < report.index("**base**")  # ranked with references
    assert "| average (question-weighted) | 30.0 | 20.0 | -10.0 |" in report
    # Where the expert is, and the command that exports it.
    assert summary["expert"] == {"adapter": "select/select/adapter", "base": "quantize/quantize"}
    assert ("The expert is the adapter `select/select/adapter` on the base `quantize/quantize`, in the artifact "
            "store. `expert export ARTIFACTS/select/select --out DIR`") in report


def test_inline_images_embeds_local_plots_only(tmp_path):
    folder = tmp_path / "report"
    (folder / "sub").mkdir(parents=True)
    (folder / "mmlu.png").write_bytes(b"\x89PNG fake")
    # files that exist, outside the folder or below it: a link to them must stay a link
    (tmp_path / "secret.png").write_bytes(b"\x89PNG secret")
    (folder / "sub" / "deep.png").write_bytes(b"\x89PNG deep")
    text = "# r\n![mmlu](mmlu.png)\n![gone](missing.png)\n![up](../secret.png)\n![down](sub/deep.png)\n"
    out = inline_images(text, folder)
    assert "![mmlu](data:image/png;base64,iVBORyBmYWtl)" in out
    assert "![gone](missing.png)" in out and "![up](../secret.png)" in out and "![down](sub/deep.png)" in out
    assert out.count("base64,") == 1


def mmlu_report(tmp_path, base_shots, expert_shots):
    mmlu = {"average": 0.3, "subject_mean": 0.28, "n": 114, "categories": {"STEM": 0.25}}
    upstream = {f"mmlu/{name}": artifact(tmp_path, f"mmlu/{name}", {"metrics.json": {
        **mmlu, **({} if shots is None else {"num_shots": shots})}}) for name, shots in
        (("base", base_shots), ("expert", expert_shots))}
    out = tmp_path / "out"
    out.mkdir()
    write_pipeline_report(upstream, {"name": "t"}, out)
    return (out / "report.md").read_text()


def test_an_mmlu_subset_is_flagged_against_published_full_mmlu_numbers(tmp_path):
    # 2 questions per subject (the default preset): 114 of 14,042. The expert's 30% on 114
    # questions has a standard error of sqrt(0.3 * 0.7 / 114) = 4.3 points.
    report = mmlu_report(tmp_path, 5, 5)
    assert ("Not like-for-like with published MMLU results: this run scored n=114 of MMLU's 14,042 test questions "
            "(eval.mmlu_subjects, eval.mmlu_max_per_subject; standard error about \u00b14.3 points) and the published "
            "results all of them.") in report
    assert "Categories as in the MMLU paper (hendrycks/test categories.py); lm-eval puts anatomy in STEM" in report


def test_mmlu_on_the_full_test_set_needs_no_subset_note(tmp_path):
    mmlu = {"average": 0.3, "subject_mean": 0.28, "n": 14_042, "categories": {"STEM": 0.25}, "num_shots": 5}
    upstream = {f"mmlu/{n}": artifact(tmp_path, f"mmlu/{n}", {"metrics.json": mmlu}) for n in ("base", "expert")}
    (tmp_path / "out").mkdir()
    write_pipeline_report(upstream, {"name": "t"}, tmp_path / "out")
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| questions | 14042 | 14042 |" in report and "Not like-for-like" not in report
    assert "lm-eval puts anatomy in STEM" in report  # the categories are the paper's either way


def test_mmlu_heading_says_the_recorded_shots(tmp_path):
    assert "## MMLU (1-shot): what tuning costs" in mmlu_report(tmp_path, 1, 1)


def test_mmlu_heading_without_recorded_shots_claims_none(tmp_path):  # metrics.json from before num_shots
    report = mmlu_report(tmp_path, None, None)
    assert "## MMLU (shot count not recorded): what tuning costs" in report and "5-shot" not in report


def test_mmlu_heading_names_each_runs_shots_when_they_differ(tmp_path):
    assert "## MMLU (base: shot count not recorded, expert: 5-shot): what" in mmlu_report(tmp_path, None, 5)


def test_a_dev_split_run_is_named_so_and_not_ranked_among_published_test_results(tmp_path):
    pubmedqa = {"accuracy": 0.5, "macro_f1": 0.4, "n": 50}
    upstream = {"pubmedqa/expert": artifact(tmp_path, "pubmedqa/expert", {"metrics.json": pubmedqa})}
    for split in ("test", "dev"):
        out = tmp_path / split
        out.mkdir()
        write_pipeline_report(upstream, {"name": "t", "eval": {"pubmedqa_split": split}}, out)
        report = (out / "report.md").read_text()
        assert f"## PubMedQA (reasoning-required, {split} split)" in report
        assert ("GPT-4" in report) == (split == "test"), report


def test_mmlu_change_is_computed_before_rounding(tmp_path):
    mmlu = {"average": 0.4684, "subject_mean": 0.4686, "n": 114, "categories": {"STEM": 0.25}}
    upstream = {"mmlu/base": artifact(tmp_path, "mmlu/base", {"metrics.json": mmlu}),
                "mmlu/expert": artifact(tmp_path, "mmlu/expert", {"metrics.json": {
                    **mmlu, "average": 0.4696, "subject_mean": 0.4694}})}
    out = tmp_path / "out"
    out.mkdir()
    write_pipeline_report(upstream, {"name": "t"}, out)
    report = (out / "report.md").read_text()
    assert "| average (question-weighted) | 46.8 | 47.0 | 0.1 |" in report  # not 0.2
    assert "| mean over subjects | 46.9 | 46.9 | 0.1 |" in report  # not 0.0


def test_report_says_where_each_evaluation_scored_and_warns_when_precisions_differ(tmp_path):
    def metrics(dtype, device="cpu", kernel=None):
        timing = {"device": device, "dtype": dtype} | ({"gptq_kernel": kernel} if kernel else {})
        return {"accuracy": 0.5, "macro_f1": 0.4, "n": 500, "timing": timing}

    def report(**runs):
        folder = tmp_path / f"report{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        upstream = {f"pubmedqa/{name}": artifact(folder, f"pubmedqa/{name}", {"metrics.json": value})
                    for name, value in runs.items()}
        out = folder / "out"
        out.mkdir()
        write_pipeline_report(upstream, {"name": "t"}, out)
        return (out / "report.md").read_text()

    alike = report(base=metrics("bfloat16", "cuda:0"), expert=metrics("bfloat16", "cuda:1"))
    assert "Scored on: pubmedqa base (cuda, bfloat16); pubmedqa expert (cuda, bfloat16)." in alike
    assert "different precisions" not in alike
    # A cached float32 evaluation beside a new bf16 one (eval.dtype 'auto' is resolved where it scores).
    mixed = report(base=metrics("float32"), expert=metrics("bfloat16"))
    assert "pubmedqa base (cpu, float32); pubmedqa expert (cpu, bfloat16)" in mixed
    assert "**These evaluations were scored in different precisions.**" in mixed and "--force evaluate" in mixed
    assert "different kernels" not in mixed
    # The same dtype, GPTQ layers of two kernels ('auto' on GPUs of two generations).
    kernels = report(base=metrics("bfloat16", "cuda", "MacheteLinear"),
                     expert=metrics("bfloat16", "cuda", "MarlinLinear"))
    assert "pubmedqa base (cuda, bfloat16, MacheteLinear); pubmedqa expert (cuda, bfloat16, MarlinLinear)" in kernels
    assert "**The GPTQ evaluations were scored with different kernels**" in kernels
    assert "`eval.gptq_kernel` by name" in kernels and "different precisions" not in kernels
    # The default pipeline: a float base (no kernel) beside the GPTQ model and the expert, one kernel.
    pipeline = report(base=metrics("bfloat16"), quantized=metrics("bfloat16", kernel="TorchLinear"),
                      expert=metrics("bfloat16", kernel="TorchLinear"))
    assert "pubmedqa base (cpu, bfloat16);" in pipeline
    assert "pubmedqa quantized (cpu, bfloat16, TorchLinear)" in pipeline
    assert "different precisions" not in pipeline and "different kernels" not in pipeline
    old = report(base={"accuracy": 0.5, "macro_f1": 0.4, "n": 500}, expert=metrics("float32"))
    assert "pubmedqa base (not recorded)" in old and "different precisions" not in old  # unknown is no proof


def test_results_plot_and_majority_baseline_are_in_the_report(tmp_path):
    from expert.report_plots import majority_accuracy, mmlu_bars, pubmedqa_bars

    majority = {"label": "yes", "accuracy": 0.552, "macro_f1": 0.237}
    runs = {"expert": {"accuracy": 0.39, "macro_f1": 0.249, "n": 500, "majority_baseline": majority},
            "base": {"accuracy": 0.434, "macro_f1": 0.298, "n": 500, "majority_baseline": majority},
            "quantized": {"accuracy": 0.396, "macro_f1": 0.255, "n": 500, "majority_baseline": majority}}
    mmlu = {"base": {"average": 0.281, "subject_mean": 0.28, "n": 114, "chance": 0.25,
                     "categories": {"other": 0.286, "STEM": 0.306}},
            "expert": {"average": 0.184, "subject_mean": 0.18, "n": 114, "chance": 0.25,
                       "categories": {"other": 0.25, "STEM": 0.194}}}
    # what the plot draws: pipeline order, percent, MMLU's category order then the average
    assert [(n, round(a, 1), round(f, 1)) for n, a, f in pubmedqa_bars(runs)] == [
        ("base", 43.4, 29.8), ("quantized", 39.6, 25.5), ("expert", 39.0, 24.9)]
    assert round(majority_accuracy(runs), 1) == 55.2 and majority_accuracy({"base": {}}) is None
    labels, values = mmlu_bars(mmlu)
    assert labels == ["STEM", "other", "average"]
    assert [round(v, 1) for v in values["expert"]] == [19.4, 25.0, 18.4] and list(values) == ["base", "expert"]

    upstream = {f"pubmedqa/{n}": artifact(tmp_path, f"pubmedqa/{n}", {"metrics.json": m}) for n, m in runs.items()}
    upstream |= {f"mmlu/{n}": artifact(tmp_path, f"mmlu/{n}", {"metrics.json": m}) for n, m in mmlu.items()}
    out = tmp_path / "out"
    out.mkdir()
    write_pipeline_report(upstream, {"name": "t", "model": {"source": "m"}}, out)
    assert (out / "results.png").read_bytes().startswith(b"\x89PNG")
    report = (out / "report.md").read_text()
    assert report.index("![results](results.png)") < report.index("## PubMedQA")  # at a glance, first
    assert report.count("results.png") == 1
    assert "| always 'yes' (the split's majority answer) | 55.2 | 23.7 |" in report
    assert report.index("GPT-4") < report.index("always 'yes'") < report.index("**base**")  # ranked among them


def test_no_results_plot_without_evaluations(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    write_pipeline_report({}, {"name": "t", "model": {"source": "m"}}, out)
    assert not (out / "results.png").exists() and "results.png" not in (out / "report.md").read_text()
