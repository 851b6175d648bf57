"""bench/gpu.py runs end to end in its CPU smoke mode.

GPU time comes a few minutes at a time, so a script that breaks on the machine wastes it: every
case and option of the next planned call runs here on tiny shapes (numbers are not checked,
only that each case produced its rows and its quality checks). --ours-compile runs in the
original job's case only: the 8B case runs the same code.
"""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _smoke(tmp_path: Path, *args: str) -> tuple[dict, dict]:
    """`bench/gpu.py --smoke ARGS`, once it exited 0 and left no temp folder behind: its gpu.json,
    and its summary rows in the issue's result format (by metric) but the original job's."""
    cmd = [sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke", "--out", str(tmp_path), *args]
    tmp = tmp_path / "tmp"  # the script's temp folders, which it must remove
    tmp.mkdir()
    # torch's compile cache stays where it was (it lives under the temp folder by default): a
    # cold one costs this test about a minute.
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    env = {**os.environ, "TMPDIR": str(tmp), "TORCHINDUCTOR_CACHE_DIR": cache_dir()}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(tmp.glob("gptq-*")), sorted(p.name for p in tmp.iterdir())
    result = json.loads((tmp_path / "gpu.json").read_text())
    summary = {row["metric"].split(",")[0]: row for row in result["results"] if "original job" not in row["metric"]}
    assert all({"metric", "unit", "peer", "ours", "ratio", "quality"} <= set(row) for row in summary.values()), summary
    return result, summary


@pytest.mark.slow
def test_gpu_script_smoke_runs_the_original_job_eval_and_gptq_cases(tmp_path):
    # Two calls, so that CI's two workers can take one each; the 8B case runs below, without
    # --ours-compile: its compiled side is the 33B case's code on other LoRA targets, and
    # compiling costs about a minute here. Each GPTQ side is a process that imports gptqmodel
    # (~15 s here): ours-cold, the same command as ours, is left out (--gptq-sides), and so is
    # --gptq-train-compile (~30 s of compiling; test_train_compile.py trains a GPTQ base compiled).
    result, summary = _smoke(
        tmp_path, "--cases", "eval,llama-33b,gptq", "--ours-plain", "--ours-divisor", "--ours-compile",
        "--train-fresh", "--ours-pad-multiple", "64", "--eval-profile", "--eval-pack-sweep", "64",
        "--eval-variants", "exact,fixed,efficient,fixed-efficient,one-row,read-each", "--gptq-layers", "1", "--gptq-gpu-pack",
        "--gptq-checkpoint", "--gptq-sides", "ours-gpupack,peer,ours,ours-checkpoint",
        "--gptq-eval-kernels", "auto,torch_aten")

    # The 33B case's step of 50 on the CPU (auto allows up to 8 there): ours in micro-batches of 8 and 7,
    # then at 5, the largest divisor, and the peer at 8.
    big = [row for row in result["train"] if row["case"].startswith("33b")]
    assert [row["side"] for row in big] == ["peer", "ours", "ours-plain", "ours-pad64", "ours-divisor",
                                            "ours-compile", "peer@ours-micro"], big
    assert (big[1]["micro_batch"], big[1]["step_micro_batches"]) == (8, [8, 7, 7, 7, 7, 7, 7]), big[1]
    assert (big[4]["micro_batch"], big[4]["step_micro_batches"], big[6]["micro_batch"]) == (5, [5] * 10, 8), big
    assert all("error" not in row for row in big), big
    uneven = next(r for r in result["results"] if r["metric"].endswith("(original job)"))["uneven_micro_batches"]
    assert uneven["divisor"]["micro_batch"] == 5 and uneven["ratio"] > 0, uneven
    # train.compile: the same model's loss before training (rounding apart), its compiling timed.
    compiled = next(r for r in result["results"]
                    if r["metric"].startswith("Compiled") and "original job" in r["metric"])
    assert compiled["ratio"] > 0 and compiled["quality"]["same_objective"] is True, compiled
    setup = compiled["quality"]["setup_seconds"]
    assert setup["compiled"] > setup["eager"], setup  # the compiling falls in the first forward and the plan

    assert set(summary) == {"MMLU-shaped 5-shot scoring"}, sorted(summary)  # no GPTQ ratio without ours-cold

    ev = result["eval"]
    assert "error" not in ev, ev
    assert ev["same_prediction"] == f"{ev['peer_questions']}/{ev['peer_questions']}"
    assert [v["variant"] for v in ev["variants"]] == ["exact", "fixed", "efficient", "fixed-efficient", "one-row",
                                                      "read-each"]
    assert all(v["work"]["tokens"] >= ev["ours_suffix_tokens"] for v in ev["variants"]), ev["variants"]
    # The smoke's packs have rows of 64 tokens (4 to a pack of 256): far fewer attention pairs than
    # the same tokens in one row, the layout of variant one-row.
    assert ev["ours_path"].endswith("256 tokens per pack in 4 rows of 64"), ev["ours_path"]
    by_name = {v["variant"]: v["work"] for v in ev["variants"]}
    assert by_name["one-row"]["attention_pairs"] > 1.25 * by_name["fixed"]["attention_pairs"], by_name
    assert ev["pack_sweep"][0]["pack_tokens"] == 64 and ev["profile"]["top"]
    assert ev["ours_peak_gib"] is None  # measured on a GPU only
    work = ev["ours_work"]  # every question's suffix went through the layers, and some pack padding
    assert work["tokens"] >= ev["ours_suffix_tokens"] and work["tflop_per_s"] > 0, work
    assert work["attention_pairs"] > work["tokens"] and 0 < work["attention_share"] < 1, work

    gptq = result["gptq"]
    assert all("seconds" in gptq[side] for side in ("ours-gpupack", "peer", "ours")) and "ours-cold" not in gptq, gptq
    # Without the cold run the peer's time may hold gptqmodel's one-off build: no ratio, and why.
    assert gptq["ratio"] is None and "ours-cold was not run (--gptq-sides)" in gptq["ratio_note"], gptq
    # On the CPU gptqmodel falls back from CUDA packing to its plain packing: the same tensors.
    assert gptq["gpupack_identical_tensors"]["identical"] == same_count(gptq) and gptq["gpupack_ratio"] > 0, gptq
    assert "GPU packing requested" in (tmp_path / "gptq_ours-gpupack.log").read_text()  # the setting got there
    same = gptq["identical_tensors"]
    assert same["identical"] == same["ours"] == same["peer"] > 0, same
    # The stage's layer checkpoints: written (streamed, as on a GPU), the same tensors, a time beside ours'.
    assert gptq["checkpoint_identical_tensors"] == {"identical": same_count(gptq), "ours-checkpoint": same_count(gptq),
                                                    "ours": same_count(gptq)}, gptq
    assert gptq["checkpoint_disk_mib"] > 0 and gptq["checkpoint_time_ratio"] > 0, gptq
    assert {p.name for p in tmp_path.iterdir()} >= {"gpu.json", "gptq_ours.log", "gptq_peer.log", "gptq_train.log"}
    # The training check's log says where it was, phase by phase (a killed call keeps it).
    phases = (tmp_path / "gptq_train.log").read_text()
    assert "trained: {" in phases and "inference with auto: {" in phases, phases[-2000:]
    assert "inference with torch_aten: {" in phases and "nf4 trained: {" in phases, phases[-2000:]

    # Ours' GPTQ output trained and scored as the pipeline does, beside an NF4 base of the same weights.
    assert gptq["base_dtype"] == "float16"  # the 33B preset's LLaMA checkpoint
    train = gptq["train"]
    assert "error" not in train, train
    assert train["gptq"]["kernels"] == ["TorchLinear"] and train["nf4"]["kernels"] == ["Linear4bit"], train
    for side in ("gptq", "nf4"):
        row = train[side]
        assert row["losses"][-1] < row["losses"][0] and row["tokens_per_s"] > 0, row  # it learns
        assert row["first_layer_lora_b_abs_sum"] > 0, row  # the gradient came back through the layer above
    assert abs(train["gptq"]["initial_loss"] - train["nf4"]["initial_loss"]) < 0.05 * train["nf4"]["initial_loss"]
    resume = train["gptq"]["resume"]  # the checkpoint gives back what was saved, and the same next step
    done, total = map(int, resume["tensors_restored"].split("/"))
    assert done == total > 0 and resume["loss_after_resume"] == resume["loss_after_save"], resume
    assert train["gptq"]["optimizer"] == "AdamW8bit", train  # the preset's paged one needs CUDA
    ev = train["eval"]  # the inference kernel gives the training kernel's loss; caching changes no prediction
    assert abs(ev["loss_vs_training_kernel"]) < 1e-2 and ev["prefix_cache_same_predictions"] == ev["questions"], ev
    # float32 on the CPU: gptqmodel's torch kernel (its int4 kernel, which it would pick, multiplies in bf16)
    assert ev["gptq_kernel"] == "auto" and ev["kernels"] == ["TorchLinear"] and ev["questions_per_s"] > 0, ev
    # --gptq-eval-kernels' second kernel, loaded and timed after the rest: eval.gptq_kernel reached the load.
    (other,) = train["eval_other_kernels"]
    assert other["gptq_kernel"] == "torch_aten" and other["kernels"] == ["TorchAtenLinear"], other
    assert abs(other["loss"] - ev["loss"]) < 1e-2 and other["questions_per_s"] > 0, other
    assert 0 <= other["same_predictions_as_first"] <= other["questions"], other
    # The expert's evaluation: the saved adapter on the inference kernel gives the trained model's
    # loss, not the base's.
    adapter, trained = ev["adapter"], resume["checkpoint_eval_loss"]
    assert adapter["lora_layers"] > 0 and adapter["scores"] == ev["questions"], adapter
    assert abs(adapter["loss"] - trained) < 0.25 * abs(ev["loss"] - trained), (adapter, trained, ev["loss"])
    assert train["gptq_vs_nf4_tokens_per_s"] > 0 and "gptq_compiled" not in train  # --gptq-train-compile's


@pytest.mark.slow
def test_gpu_script_smoke_runs_the_8b_preset_case(tmp_path):
    result, summary = _smoke(tmp_path, "--cases", "llama3-8b", "--ours-plain", "--ours-pad-multiple", "64",
                             "--train-profile", "--train-fresh", "--ours-whole-recompute")
    # The 8B preset's 48 divides by 8: no ours-divisor side, no peer at ours' micro-batch (the peer's own).
    train = [row for row in result["train"] if row["case"].startswith("8b")]
    assert [row["side"] for row in train] == ["peer", "ours", "ours-plain", "ours-pad64", "ours-whole"], train
    assert all("error" not in row and row["tokens_per_s"] > 0 < row["fresh_tokens_per_s"] for row in train), train
    assert all(row["fresh_mean_tokens"] > 0 for row in train), train
    assert train[1]["profile"]["top"] and all("profile" not in row for row in train[2:])  # ours only
    profile = train[1]["profile"]  # the busy fraction is against the same call unprofiled
    assert 0 < profile["busy_fraction"] and profile["profiled_wall_s"] > 0, profile
    assert abs(profile["busy_fraction"] * profile["wall_s"] - profile["busy_s"]) < 0.02, profile  # (rounded)
    assert profile["useful_tokens"] > 0 < profile["micro_batches"], profile
    assert profile["host"]["ops"] and profile["host"]["ops_self_s"] > 0, profile  # no CUDA runtime on the CPU
    assert any(op["name"].startswith("aten::") for op in profile["host"]["ops"]), profile
    # Widths rounded up to 64: the same useful tokens in more padding (tiny examples are ~40 tokens).
    assert train[3]["padding_fraction"] > train[1]["padding_fraction"] + 0.2, train

    # Both sides trained the same objective: the same loss on the same batch before training (LoRA's B is 0).
    assert abs(train[0]["initial_loss"] - train[1]["initial_loss"]) < 1e-2 * train[0]["initial_loss"], train
    assert all(row["timed_examples"] > 0 < row["timed_mean_tokens"] for row in train), train
    assert set(summary) == {"LoRA training"}, sorted(summary)
    assert summary["LoRA training"]["quality"]["same_objective"] is True
    assert summary["LoRA training"]["quality"]["ours_within_memory_limit"] is None  # no GPU peak on the CPU
    # Recomputing only some layers against all or none: the same plan here, where all fits without.
    partial = summary["LoRA training"]["partial_recompute"]
    assert partial["ours"]["gradient_checkpointing"] is partial["whole"]["gradient_checkpointing"] is False
    assert partial["ours"]["micro_batch"] == partial["whole"]["micro_batch"] and partial["ratio"] > 0, partial


def same_count(gptq: dict) -> int:
    return gptq["identical_tensors"]["peer"]


def test_timed_and_fresh_batches_have_the_same_spread(monkeypatch):
    # The two sets of timed batches must both span the widths: alternating over a width-sorted
    # list gave one set every pair's shorter batch (a real H100 run: 275.7 tokens against 337).
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import gpu

    for n in (4, 8, 12, 16):
        seen, unseen = gpu._two_sets(list(range(n)))
        assert sorted(seen + unseen) == list(range(n)) and len(seen) == len(unseen)
        assert sum(seen) == sum(unseen), (n, seen, unseen)


def test_the_peers_batches_are_grouped_by_length_as_trainer_groups_them(monkeypatch):
    """transformers' LengthGroupedSampler: megabatches of 50 steps' examples, sorted longest first."""
    import random

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import gpu

    rng = random.Random(0)
    lengths = [rng.randrange(50, 600) for _ in range(400)]
    batches = gpu._length_grouped(lengths, micro=2, effective=4, rng=random.Random(1))
    assert sorted(i for b in batches for i in b) == list(range(400))  # an epoch: every example once
    for start in range(0, 400, 200):  # each megabatch of 50 x 4 examples: longest first
        run = [lengths[i] for b in batches[start // 2:(start + 200) // 2] for i in b]
        assert run == sorted(run, reverse=True)
    padding = sum(max(lengths[i] for i in b) * 2 - sum(lengths[i] for i in b) for b in batches) / sum(lengths)
    assert padding < 0.05  # random pairs of these lengths pad ~20%


def test_a_peak_over_the_memory_limit_is_flagged(monkeypatch):
    # The 8B run of 2026-11-27 peaked at 29.5 GiB under a 24 GiB plan: the result must say so.
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import gpu

    def row(side, peak):
        return {"case": "8b", "side": side, "micro_batch": 8, "tokens_per_s": 100.0, "initial_loss": 11.76,
                "timed_mean_tokens": 337.0, "peak_gib": peak}

    for peak, within in ((29.51, False), (19.1, True)):
        summary = gpu._summary({"train": [row("peer", 12.9), row("ours", peak)]})
        assert summary[0]["quality"]["ours_within_memory_limit"] is within


def test_the_whole_recompute_side_plans_as_before_partial_recompute(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import gpu

    from expert.train.recompute import fewest

    for needed in range(9):  # the fewest layers the micro-batch needs: the old plan takes none or all
        assert gpu._all_or_none(8, lambda r: r >= needed) == (0 if needed == 0 else 8)
        assert fewest(8, lambda r: r >= needed) == needed


def test_a_failed_comparison_side_leaves_the_ratio_of_record(monkeypatch):
    # A side that failed (its row holds only "error") must not take the summary, and so the
    # whole JSON, down with it: its comparison is left out, the ratio against the peer stays.
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import gpu

    side = {"initial_loss": 5.0, "micro_batch": 8, "tokens_per_s": 100.0, "timed_mean_tokens": 300.0,
            "gradient_checkpointing": True, "memory_plan": {"probe_tokens_per_s": None}}
    sides = {"peer": side, "ours": {**side, "tokens_per_s": 200.0}, "ours-whole": {"error": "OOM"},
             "ours-divisor": {"error": "OOM"}}
    row = gpu._training_row("33b", sides)
    assert row["ratio"] == 2.0 and "partial_recompute" not in row and "uneven_micro_batches" not in row
    sides["ours-whole"] = {**side, "tokens_per_s": 160.0}
    assert gpu._training_row("33b", sides)["partial_recompute"]["ratio"] == 1.25


def test_sides_cut_a_call_to_the_sides_named(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import gpu

    args = gpu._parser().parse_args(["--out", "x", "--ours-compile", "--ours-divisor", "--ours-whole-recompute"])
    assert gpu._train_sides(args) == ["peer", "ours", "ours-divisor", "ours-compile", "ours-whole", "peer@ours-micro"]
    args.sides = "ours-compile,ours"
    assert gpu._train_sides(args) == ["ours", "ours-compile"]  # the run's order, not the flag's
    args.sides = "ours,ours-compiled"
    with pytest.raises(SystemExit, match="--sides: ours-compiled not among the sides these flags run: peer, ours"):
        gpu._train_sides(args)


def test_the_budget_side_runs_after_the_compiled_one_and_is_compared_with_it(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import gpu

    args = gpu._parser().parse_args(["--out", "x", "--ours-compile", "--ours-compile-budget", "0.3"])
    assert gpu._train_sides(args) == ["peer", "ours", "ours-compile", "ours-budget", "peer@ours-micro"]
    assert "ours-budget" not in gpu._train_sides(gpu._parser().parse_args(["--out", "x", "--ours-compile"]))

    def row(side, speed, micro, layers, budget):
        return {"case": "33b", "side": side, "micro_batch": micro, "tokens_per_s": speed, "initial_loss": 10.3686,
                "gradient_checkpointing": True, "recomputed_layers": layers, "peak_gib": 21.0,
                "initial_seconds": 2.0, "plan_seconds": 9.0, "compile_memory_budget": budget}

    rows = gpu._summary({"train": [row("ours-compile", 2500.0, 9, None, 1.0), row("ours-budget", 3000.0, 6, 20, 0.3)]})
    (budget,) = [r for r in rows if r["metric"].startswith("Compiled training with a memory budget of 0.3")]
    assert budget["ratio"] == 1.2 and budget["peer"]["value"] == 2500.0 and budget["ours"]["value"] == 3000.0
    assert budget["quality"]["plans"]["budget"] == {"micro_batch": 6, "recomputed_layers": 20,
                                                    "gradient_checkpointing": True, "peak_gib": 21.0}


def test_the_compiled_side_is_compared_with_ours_even_without_the_peer(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import gpu

    def row(side, speed, loss, peak):
        return {"case": "33b", "side": side, "micro_batch": 8, "tokens_per_s": speed, "initial_loss": loss,
                "timed_mean_tokens": 337.0, "peak_gib": peak, "initial_seconds": 2.0, "plan_seconds": 9.0}

    (only,) = gpu._summary({"train": [row("ours", 2000.0, 10.3686, 19.1), row("ours-compile", 2600.0, 10.3690, 25.0)]})
    assert only["ratio"] == 1.3 and only["peer"]["value"] == 2000.0 and only["ours"]["value"] == 2600.0
    assert only["quality"]["same_objective"] is True and only["quality"]["compiled_within_memory_limit"] is False
    assert only["quality"]["setup_seconds"] == {"eager": 11.0, "compiled": 11.0}


def test_gptq_sides_cut_the_quantization_runs(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import gpu

    args = gpu._parser().parse_args(["--out", "x", "--gptq-gpu-pack", "--gptq-checkpoint"])
    assert gpu._gptq_sides(args) == ["ours-gpupack", "ours-cold", "peer", "ours", "ours-checkpoint"]
    args.gptq_sides = "ours"  # one quantization, then the training check on its output
    assert gpu._gptq_sides(args) == ["ours"]
    args.gptq_sides = "ours,per"
    with pytest.raises(SystemExit, match="--gptq-sides: per unknown"):
        gpu._gptq_sides(args)


def test_the_gptq_row_is_written_only_with_a_ratio(monkeypatch):
    # The smoke runs no ours-cold side (it costs a gptqmodel import): the row as a GPU run writes it.
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import gpu

    same = {"identical": 12, "ours": 12, "peer": 12}
    gptq = {"peer": {"seconds": 90.0}, "ours": {"seconds": 60.0}, "ratio": 1.5, "identical_tensors": same}
    (row,) = gpu._summary({"train": [], "gptq": gptq})
    assert row["metric"] == "GPTQ 4-bit quantization wall time" and row["ratio"] == 1.5, row
    assert (row["peer"]["value"], row["ours"]["value"], row["quality"]) == (90.0, 60.0, {"identical_tensors": same})
    assert gpu._summary({"train": [], "gptq": {**gptq, "ratio": None}}) == []  # ours-cold unfinished: the peer paid the build


def test_a_failed_gptq_child_leaves_its_whole_output_in_its_log(monkeypatch, tmp_path):
    # A child's error in the result is its last 600 characters; where it failed must be in the log.
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import gpu

    script = "import sys; print('loaded the trained adapter'); sys.stderr.write('File \"where.py\"\\n' + 'x' * 5000); sys.exit(3)"
    row = gpu._gptq_process([sys.executable, "-c", script], "train", tmp_path, 60, dict(os.environ))
    assert len(row["error"]) <= 600 and 'File "where.py"' not in row["error"]
    log = (tmp_path / "gptq_train.log").read_text()
    assert "loaded the trained adapter" in log and 'File "where.py"' in log and "x" * 5000 in log


def test_scoring_through_an_older_transformers_cache_name(monkeypatch):
    # The GPU image's transformers (5.17) names the KV cache `past_key_values`, the pinned one
    # `cache`; expert's prefix-cached scoring speaks the latter. The GPTQ check scored without the
    # wrapper once and died on the H200. A model speaking the old names, wrapped, scores as the
    # model itself; models that already speak `cache`, PEFT ones included, are left as they are.
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import gpu
    from peft import LoraConfig, get_peft_model

    from expert.evaluation.scoring import Question, score_questions
    from tests.fixtures.models import _tiny_llama

    model, _ = _tiny_llama(seed=0, tie_word_embeddings=True)

    class OldNames(torch.nn.Module):  # what 5.17's forward takes and returns
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                    use_cache=None, logits_to_keep=0, **kwargs):  # 5.17 takes (and drops) the rest
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=past_key_values, use_cache=use_cache, logits_to_keep=logits_to_keep)
            return types.SimpleNamespace(logits=out.logits, past_key_values=out.cache)

    old = OldNames(model)
    wrapped = gpu._CacheKwarg.wrap(old)
    assert wrapped is not old
    prefix = [5 + i % 20 for i in range(24)]  # over MIN_PREFIX_TOKENS: the run uses the prefix cache
    questions = [Question(prefix + [30 + i, 31], [[3], [4], [5]]) for i in range(4)]
    with torch.no_grad():
        ours = score_questions(wrapped, questions, max_length=64, groups=[list(range(4))])
        with pytest.raises(AttributeError, match="cache"):  # what the GPTQ check met
            score_questions(old, questions, max_length=64, groups=[list(range(4))])
        plain = score_questions(model, questions, max_length=64)
    assert max(abs(a - b) for x, y in zip(ours, plain) for a, b in zip(x, y)) < 1e-4

    assert gpu._CacheKwarg.wrap(model) is model
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert gpu._CacheKwarg.wrap(peft) is peft  # its forward takes **kwargs: the model inside decides
