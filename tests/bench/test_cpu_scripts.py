"""The CPU benchmark scripts run end to end on tiny inputs and write results in the issue's format.

The committed results were measured on SmolLM2-135M and the real PubMedQA; here each script gets
a tiny random Llama and a few made-up PubMedQA records, so only that it runs, writes every field
of the result format and passes its own quality check is tested, never a speed. Not covered:
`eval_vs_lmeval.py` (needs lm-evaluation-harness in its own environment) and
`pipeline_overhead.py` (times `make run`'s whole pipeline on the embedded model). `merge.py` gets a
tiny store made by the real stages.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.data import write_pubmedqa_json
from tests.fixtures.models import tiny_llama_dir

pytestmark = pytest.mark.slow  # each test runs a benchmark script on a model

ROOT = Path(__file__).resolve().parents[2]
FIELDS = {"metric", "unit", "peer", "ours", "ratio", "machine", "versions", "command", "date"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A tiny model folder and a formatted PubMedQA folder (the data stage's output)."""
    root = tmp_path_factory.mktemp("bench-inputs")
    source = write_pubmedqa_json(root / "ori_pqal.json", n=60)
    data = root / "pubmedqa"
    _run([sys.executable, "-m", "expert.cli", "format", "pubmedqa", "--source", str(source), "--out", str(data)])
    return {"model": tiny_llama_dir(root / "model"), "data": data}


def _run(cmd: list[str], env: dict | None = None) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-3000:]}"


def _bench(script: str, out: Path, *args: str) -> dict:
    # The script's temp folders go to a folder of the test's own, which must be left without them.
    tmp = out.parent / "tmp"
    tmp.mkdir()
    _run([sys.executable, str(ROOT / "bench" / script), *args, "--out", str(out)], env={**os.environ, "TMPDIR": str(tmp)})
    assert not list(tmp.glob("bench-*")), sorted(p.name for p in tmp.iterdir())
    result = json.loads(out.read_text())
    assert FIELDS <= result.keys(), sorted(FIELDS - result.keys())
    assert result["peer"]["name"] and result["peer"]["value"] > 0 < result["ours"]["value"], result
    assert result["ratio"] > 0 and str(out.parent) not in result["command"], result["command"]
    return result


def test_train_vs_trainer(inputs, tmp_path):
    result = _bench("train_vs_trainer.py", tmp_path / "train.json", "--model", str(inputs["model"]),
                    "--data", str(inputs["data"]), "--examples", "16", "--dev-examples", "4", "--max-length", "128",
                    "--ours-float32", "--peer-bf16", "--learning-rate", "0.01")  # steps that move the loss
    # Both sides trained the same examples and were scored on the same dev examples.
    peer, ours = result["runs"]["peer"][0], result["runs"]["ours"][0]
    assert peer["tokens"] == ours["tokens"] == peer["tokens_counted"] > 0 and result["dev_loss"]["examples"] == 4
    # Two steps each: the second one's throughput is each side's, the ratios at equal precision.
    assert peer["steps"] == ours["steps"] == 2 and all(
        r["tokens_per_s_after_first_step"] > 0 < r["first_step_seconds"] for rows in result["runs"].values() for r in rows)
    assert {"float32", "ours (default) vs peer (default)"} <= result["after_first_step"]["ratio"].keys()
    assert result["quality_ok"] is True, (result["dev_loss"], result["equal_precision"])
    assert set(result["runs"]) == {"peer", "ours", "peer-bf16", "ours-float32"}
    assert "float32" in result["equal_precision"]  # bf16 too where this CPU multiplies bf16 natively
    assert result["dev_loss"]["untrained"] > max(r["dev_loss"] for rows in result["runs"].values() for r in rows)


def test_the_peer_in_bf16_is_scored_in_float32_from_its_saved_adapter(inputs, tmp_path, monkeypatch):
    """Trainer with bf16=True leaves the trained model's forward wrapped in accelerate's bf16
    autocast: scored as that object, the peer's dev loss was a bf16 figure beside ours in float32
    (read once as the peer losing quality in bf16). It must be its saved adapter's float32 loss."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import torch
    import train_vs_trainer as bench
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = bench._parser().parse_args(["--examples", "8", "--dev-examples", "4", "--max-length", "128",
                                       "--learning-rate", "0.01"])
    data = bench._subset(inputs["data"], tmp_path / "data", 8, 4, 0)
    threads = torch.get_num_threads()
    try:
        peer = bench._peer(args, inputs["model"], data, tmp_path / "peer", bf16=True)
    finally:
        torch.set_num_threads(threads)
    fresh = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(inputs["model"], dtype="float32"),
                                      tmp_path / "peer" / "peer-adapter")
    assert peer["dev_loss"] == bench._dev_loss(fresh, AutoTokenizer.from_pretrained(inputs["model"]), data, args)


def test_train_ceiling(inputs, tmp_path):
    measured = tmp_path / "measured.json"  # a train_vs_trainer result, float32 sides only
    measured.write_text(json.dumps({"equal_precision": {"float32": {"ours": 300.0, "peer": 150.0}}}))
    out = tmp_path / "ceiling.json"
    _run([sys.executable, str(ROOT / "bench" / "train_ceiling.py"), "--model", str(inputs["model"]), "--data",
          str(inputs["data"]), "--examples", "8", "--max-length", "128", "--seconds", "0.05",
          "--measured", str(measured), "--out", str(out)])
    result = json.loads(out.read_text())
    f32, bf16 = result["float32"], result["bf16"]
    # The peer's head runs over every token, ours over the answers: more matmul work, a lower ceiling.
    assert f32["peer_ceiling"] < f32["ours_ceiling"] and f32["peer_extra_matmul_work"] > 0
    assert f32["ratio_measured"] == 2.0 and f32["ours_of_ceiling"] == pytest.approx(300.0 / f32["ours_ceiling"])
    assert "measured" not in bf16 and bf16["ours_ceiling"] > 0
    assert result["batch"]["examples"] == 8 and 0 < result["batch"]["labelled_per_useful"] < 1
    assert str(tmp_path) not in result["command"] and result["command"].startswith("python bench/train_ceiling.py")


def test_scale(inputs, tmp_path):
    result = _bench("scale.py", tmp_path / "scale.json", "--model", str(inputs["model"]), "--data", str(inputs["data"]),
                    "--train-sizes", "4,8", "--eval-sizes", "4,8", "--max-length", "64")
    assert [row["examples"] for row in result["training"]] == [4, 8], result["training"]
    assert [row["questions"] for row in result["evaluation"]] == [4, 8], result["evaluation"]


def test_quantize(inputs, tmp_path):
    result = _bench("quantize.py", tmp_path / "quantize.json", "--model", str(inputs["model"]),
                    "--data", str(inputs["data"]), "--samples", "8", "--max-length", "64", "--group-size", "32",
                    "--perplexity", "4", "--rounds", "1", "--checkpoint")
    # One round per side (what several give is tests/bench/test_common.py's): its run is the figure.
    assert [len(result["runs"][side]) for side in ("peer", "ours")] == [1, 1]
    assert result["ours"]["value"] == result["runs"]["ours"][0]["seconds"]
    same = result["identical_tensors"]
    assert same["identical"] == same["ours"] == same["peer"] > 0, same  # our settings are gptqmodel's defaults
    # The layer checkpoints: written, the same weights, and a run killed as it quantized layer 2 of 2
    # resumed there (layer 1 committed, layer 2 not yet), ending with the same weights.
    ck = result["checkpoint"]
    assert ck["identical_tensors"]["identical"] == same["ours"] and ck["disk_mib"] > 0 < ck["time_ratio"], ck
    assert (ck["layers"], ck["killed_after_layers"], ck["resumed"]["first_layer_quantized"]) == (2, 2, 2), ck
    assert ck["resumed"]["identical_tensors"]["identical"] == same["ours"], ck


def test_gptq_kernels(inputs, tmp_path, tmp_path_factory):
    from tests.expert.quantize_fixtures import tiny_setup

    gptq = tiny_setup(tmp_path_factory).gptq  # the tiny Llama in 4 bits, group size 32 (the int4 kernel's)
    # Three pairs, not the default four: each is a process that imports gptqmodel (~15 s here).
    result = _bench("gptq_kernels.py", tmp_path / "kernels.json", "--model", str(gptq), "--data",
                    str(inputs["data"]), "--pairs", "bfloat16:auto,bfloat16:torch_aten,float32:auto", "--rounds", "1")
    pairs = result["pairs"]
    # Each pair scored with the kernel it names: eval.gptq_kernel reached the load in each process.
    assert {p: row["layers"] for p, row in pairs.items()} == {
        "bfloat16:auto": "TorchLinear", "bfloat16:torch_aten": "TorchAtenLinear", "float32:auto": "TorchLinear"}, pairs
    assert all(0 <= row["same_predictions_as_auto"] <= row["n"] > 0 for row in pairs.values()), pairs
    assert pairs["bfloat16:auto"]["same_predictions_as_auto"] == pairs["bfloat16:auto"]["n"]  # itself
    assert result["ours"]["value"] == pairs["bfloat16:auto"]["questions_per_s"]
    assert result["peer"]["value"] == pairs["bfloat16:torch_aten"]["questions_per_s"]
    assert set(result["fastest"]) == {"bfloat16", "float32"}


def test_merge(tmp_path, tmp_path_factory):
    from tests.fixtures.pipeline import stage_store

    _, found = stage_store(tmp_path_factory.mktemp("merge-store"), "gptq")  # a real base + selected adapter
    result = _bench("merge.py", tmp_path / "merge.json", "--model", str(found["quantized"]), "--adapter",
                    str(found["select"] / "adapter"), "--rounds", "1")
    # Both sides wrote the same model, to the bit (float32), and said what they took.
    same = result["quality"]
    assert same["identical"] == same["tensors"] > 0 and not same["only_ours"] and not same["only_peer"], same
    assert "gptq base" in result["metric"] and result["time_s"]["ours"] > 0 < result["time_s"]["peer"], result
    assert "--model BASE_DIR --adapter ADAPTER_DIR" in result["command"], result["command"]


def test_merge_on_a_synthetic_model(tmp_path):
    result = _bench("merge.py", tmp_path / "merge.json", "--synthetic", "tiny", "--dtype", "float32", "--rounds", "1")
    same = result["quality"]
    assert same["identical"] == same["tensors"] > 0, same  # float32: the same bits as PEFT
    assert "a random tiny-shaped Llama" in result["metric"] and "--synthetic tiny" in result["command"], result


def test_lean_memory(tmp_path):
    result = _bench("lean_memory.py", tmp_path / "lean.json", "--shapes", "smollm2-135m", "--tokens", "32")
    assert result["ours"]["value"] < result["peer"]["value"], result  # lean keeps less
    assert result["quality"]["same_loss_without_dropout"] is True, result["quality"]


def test_format_scale(tmp_path):
    result = _bench("format_scale.py", tmp_path / "format.json", "--sizes", "50,200")
    assert [row["pqa_a_questions"] for row in result["scaling"]] == [50, 200], result["scaling"]
    assert result["quality"]["identical_rows"] is True, result["quality"]


def test_eval_vs_lmeval_keeps_a_result_per_setting_and_says_how_it_ran():
    # The scoring run itself needs lm-eval's own environment (see the module docstring).
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import eval_vs_lmeval as bench
    finally:
        sys.path.remove(str(ROOT / "bench"))
    plain = bench.parse_args([])
    expert = bench.parse_args(["--adapter", "ADAPTER", "--dtype", "bfloat16"])
    assert bench.default_out(plain).name == "eval_vs_lmeval.json"
    assert bench.default_out(bench.parse_args(["--adapter", "A"])).name == "eval_vs_lmeval_adapter.json"
    assert bench.default_out(expert).name == "eval_vs_lmeval_adapter_bfloat16.json"
    assert "--adapter" not in bench.command(plain) and "--dtype" not in bench.command(plain)
    assert "--adapter ADAPTER_DIR --dtype bfloat16 " in bench.command(expert)


def test_a_child_killed_for_time_leaves_what_it_printed_in_its_log(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from common import ChildFailed, run_child

    log = tmp_path / "child.log"
    script = "import sys, time; print('loaded', flush=True); print('warn', file=sys.stderr, flush=True); time.sleep(60)"
    with pytest.raises(subprocess.TimeoutExpired):
        run_child([sys.executable, "-c", script], "sleeper", log=log, timeout=5)
    assert log.read_text().split() == ["loaded", "warn"]
    # A failed child's message carries the log's tail; a good one's result comes back as before.
    with pytest.raises(ChildFailed, match="boom"):
        run_child([sys.executable, "-c", "raise SystemExit('boom')"], "failing", log=log)
    result, _ = run_child([sys.executable, "-c", "print('RESULT {\"x\": 1}')"], "good", log=log)
    assert result == {"x": 1}
