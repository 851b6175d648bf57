"""The quantize stage on the tiny Llama: config checks, group-size validation, GPTQ quantize +
reload, the report, calibration sources, and the record-only methods (nf4, none)."""

from __future__ import annotations

import json
import math
import os
import time

import pytest
import torch
from safetensors.torch import load_file

from expert.errors import ConfigError, DataError
from expert.modeling import RECORD_FILE, load_model, resolve_base
from expert.quantize import QuantizeConfig, quantize
from expert.quantize.calibration import calibration_texts, file_windows, tokenize_samples
from expert.quantize.gptq import check_group_size, cpu_workers
from expert.quantize.plots import REPORT_PNG, layer_series
from expert.quantize.report import REPORT_JSON, REPORT_MD
from tests.expert.quantize_fixtures import GROUP_SIZE, logits, relative_error, tiny_setup, write_task_data
from tests.fixtures.models import tiny_llama_dir, tiny_tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_setup(tmp_path_factory)


@pytest.mark.parametrize("data, message", [
    ({"bits": 5}, "'quantize.bits'"),
    ({"group_size": 48}, "'quantize.group_size'"),
    ({"method": "nf4", "bits": 8}, "nf4 is 4-bit only"),
    ({"methd": "gptq"}, "did you mean 'method'"),
    ({"damp_percent": 1.5}, "'quantize.damp_percent'"),
])
def test_config_rejects_bad_values(data, message):
    with pytest.raises(ConfigError, match=message):
        QuantizeConfig.from_dict(data, where="quantize")


def test_group_size_error_names_layers_and_sizes_that_fit(tmp_path):
    # SmolLM2-135M's shapes on two layers; only config.json is needed (meta device, no weights).
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=9,
                num_key_value_heads=3, vocab_size=64).save_pretrained(tmp_path)
    check_group_size(tmp_path, 64)
    with pytest.raises(ConfigError) as err:
        check_group_size(tmp_path, 128)
    msg = str(err.value)
    assert "does not divide the input size of 12 of the 14 layers" in msg  # all but down_proj
    assert "input size 576" in msg and "model.layers.0.self_attn.q_proj" in msg
    assert "1536" not in msg  # down_proj fits
    assert "fit every layer: 16, 32, 64, -1" in msg


def test_group_size_is_checked_before_any_work(tmp_path):
    base = tiny_llama_dir(tmp_path / "base")
    with pytest.raises(ConfigError, match="fit every layer: 16, 32, 64, -1"):
        quantize(QuantizeConfig(group_size=128), base, None, tmp_path / "out")
    assert not list((tmp_path / "out").iterdir())


def test_gptq_folder_is_a_standard_quantized_hf_folder(setup):
    config = json.loads((setup.gptq / "config.json").read_text())
    quant = config["quantization_config"]
    assert (quant["quant_method"], quant["bits"], quant["group_size"], quant["sym"]) == ("gptq", 4, 32, True)
    assert (quant["checkpoint_format"], quant["desc_act"]) == ("gptq", False)
    assert quant["meta"]["damp_percent"] == 0.05 and quant["meta"]["act_group_aware"] is True
    # How gptqmodel used memory (offload setting, its temporary folder) is not kept.
    assert "offload_to_disk" not in quant["meta"] and "offload_to_disk_path" not in quant["meta"]
    assert "offload_to_disk" not in (setup.gptq / "quantize_config.json").read_text()
    assert list(setup.gptq.glob("*.safetensors")) and (setup.gptq / "tokenizer.json").is_file()


def test_gptqmodel_config_carries_our_settings():
    from expert.quantize.gptq import gptqmodel_config

    ours = gptqmodel_config(QuantizeConfig(bits=8, group_size=32, sym=False, damp_percent=0.1))
    assert (ours.bits, ours.group_size, ours.sym, ours.damp_percent) == (8, 32, False, 0.1)
    assert ours.act_group_aware is True and ours.desc_act is False
    act_order = gptqmodel_config(QuantizeConfig(desc_act=True))  # act-order replaces group-aware
    assert act_order.desc_act is True and act_order.act_group_aware is False


def test_gptq_report(setup):
    report = json.loads((setup.gptq / REPORT_JSON).read_text())
    assert report["method"] == "gptq" and report["settings"]["group_size"] == 32
    assert "resumed_at_layer" not in report  # quantized in one go
    assert set(report["versions"]) == {"transformers", "optimum", "gptqmodel"}
    assert report["calibration"]["samples"] == 64 and report["calibration"]["tokens"] > 64 * 20
    assert {"perplexity_unquantized", "quantize_and_save", "evaluate_quantized", "total"} <= set(report["time_s"])
    size = report["size_bytes"]
    assert 0 < size["after"] < size["before"] / 2  # 4-bit blocks; embeddings stay float32
    ppl = report["perplexity"]
    assert ppl["texts"] == 8 and ppl["tokens"] > 100
    assert math.isfinite(ppl["unquantized"]) and math.isfinite(ppl["quantized"])
    # GPTQ moves the perplexity of this random model by a few percent; a broken packing by far more.
    assert abs(ppl["change_pct"]) < 25
    layers = report["layers"]
    assert len(layers) == 14  # 7 linear layers x 2 blocks; lm_head and embeddings stay
    # Measured ~0.06-0.08 per layer (round-to-nearest 4-bit gives ~0.09 weight error); a wrong
    # zero point, scale or group order gives errors near or above 1.
    assert all(0 < row["output_rel_error"] < 0.15 for row in layers), layers
    # gptqmodel's own per-module loss sits beside the measured error, for every layer.
    assert all(row["gptq_loss"] is not None and row["gptq_loss"] >= 0 for row in layers), layers
    assert setup.summary["perplexity_quantized"] == ppl["quantized"]
    markdown = (setup.gptq / REPORT_MD).read_text()
    assert "Per-layer reconstruction error" in markdown and f"]({REPORT_PNG})" in markdown
    assert (setup.gptq / REPORT_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_plot_draws_a_line_per_kind_of_layer_across_the_blocks():
    rows = [{"layer": f"model.layers.{block}.{kind}", "output_rel_error": 0.01 * (block + 1),
             "gptq_loss": None if kind == "mlp.up_proj" else 0.5} for block in (1, 0) for kind in
            ("self_attn.q_proj", "mlp.up_proj")]
    rows += [{"layer": "lm_head", "output_rel_error": 0.3}, {"layer": "model.layers.2.mlp.up_proj",
                                                               "output_rel_error": None}]  # not drawn
    assert layer_series(rows) == {
        "self_attn.q_proj": {"block": [1, 0], "error": [0.02, 0.01], "gptq_loss": [0.5, 0.5]},
        "mlp.up_proj": {"block": [1, 0], "error": [0.02, 0.01], "gptq_loss": [None, None]}}
    assert layer_series([{"layer": "lm_head", "output_rel_error": 0.3}]) == {}


def test_gptq_reload_inference_and_training_kernels_agree(setup):
    """gptqmodel's int4 ATen kernel (its own inference choice on a CPU, bfloat16 inside) and the
    training kernel (dequantize + float32 matmul) read the same packed weights independently:
    they must agree."""
    base, tok = load_model(setup.base)
    fast, _ = load_model(setup.gptq, gptq_kernel="torch_aten")
    slow, _ = load_model(setup.gptq, training=True)
    assert type(fast.model.layers[0].self_attn.q_proj).__name__ != type(slow.model.layers[0].self_attn.q_proj).__name__
    reference = logits(base, tok)
    assert relative_error(logits(fast, tok), logits(slow, tok)) < 0.05  # measured ~0.015
    # 4 bits on this random, chaotic model (init 0.2): ~7 % error per layer compounds to ~0.35 on
    # the logits (measured); 8 bits below meets the 0.05 bar.
    assert relative_error(logits(slow, tok), reference) < 0.6


def test_gptq_8bit_logits_close_to_unquantized(setup, tmp_path):
    quantize(QuantizeConfig(bits=8, group_size=32, num_samples=16, perplexity_samples=0),
             setup.base, setup.data, tmp_path / "q8")
    base, tok = load_model(setup.base)
    q8, _ = load_model(tmp_path / "q8")
    assert relative_error(logits(q8, tok), logits(base, tok)) < 0.05  # measured ~0.024


def test_streamed_gptq_spills_beside_its_output_and_cleans_up(setup, tmp_path, monkeypatch):
    """gptqmodel's own spill folder lives in $TMPDIR, where a killed run leaves a model's worth of
    weights; beside the output (a build's .tmp-<key>-* folder) the store's debris sweep finds it."""
    from expert.quantize import gptq

    used = []
    real = gptq.gptqmodel_config
    monkeypatch.setattr(gptq, "offload_to_disk", lambda model_dir: True)
    monkeypatch.setattr(gptq, "gptqmodel_config", lambda *args: used.append(real(*args)) or used[-1])
    out = tmp_path / ".tmp-0123456789abcdef-1234abcd"
    quantize(QuantizeConfig(bits=8, group_size=32, num_samples=8, perplexity_samples=0), setup.base, setup.data, out)
    assert [c.offload_to_disk_path for c in used] == [str(tmp_path / ".tmp-0123456789abcdef-1234abcd-offload")]
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name] and list(out.glob("*.safetensors"))


def test_task_calibration_is_seeded_and_cut_to_max_length(tmp_path):
    data = write_task_data(tmp_path / "data", n_train=20)
    tok = _tokenizer(tmp_path)
    first, source = calibration_texts("task", data, tok, n=5, max_length=16, seed=0)
    again, _ = calibration_texts("task", data, tok, n=5, max_length=16, seed=0)
    other, _ = calibration_texts("task", data, tok, n=5, max_length=16, seed=1)
    assert first == again and first != other and len(first) == 5 and "train.parquet" in source
    assert all(t.startswith("Abstract:") and t.rsplit(" ", 1)[1] in ("yes", "no", "maybe") for t in first)
    samples = tokenize_samples(first, tok, max_length=16)
    assert all(s["input_ids"].shape == (1, 16) for s in samples)


def test_file_calibration_takes_windows_of_a_text_file(tmp_path):
    tok = _tokenizer(tmp_path)
    path = tmp_path / "generic.txt"
    path.write_text("Results: the primary outcome was lower in the intervention group. " * 40)
    windows = file_windows(path, tok, n=4, max_length=12, seed=0)
    assert len(windows) == 4 and windows == file_windows(path, tok, n=4, max_length=12, seed=0)
    assert all(len(tok(w, add_special_tokens=False)["input_ids"]) <= 13 for w in windows)


@pytest.mark.parametrize("calibration, data, error, message", [
    ("task", None, ConfigError, "no data folder"),
    ("task", "empty", DataError, "train.parquet does not exist"),
    ("missing.txt", None, ConfigError, "cannot read"),
])
def test_calibration_errors_say_how_to_fix(tmp_path, calibration, data, error, message):
    data_dir = None if data is None else tmp_path / data
    path = calibration if calibration == "task" else str(tmp_path / calibration)
    with pytest.raises(error, match=message):
        calibration_texts(path, data_dir, _tokenizer(tmp_path), n=4, max_length=16, seed=0)


def test_nf4_records_settings_and_loads_the_base_in_4bit(setup, tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "stage" / "nf4"
    summary = quantize(QuantizeConfig(method="nf4", perplexity_samples=4), setup.base, setup.data, out)
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["method"] == "nf4" and record["double_quant"] is True and record["quant_type"] == "nf4"
    assert not os.path.isabs(record["base_model"]) and resolve_base(out) == setup.base.resolve()
    assert not list(out.glob("*.safetensors"))
    assert summary["size_bytes"]["after"] is None and math.isfinite(summary["perplexity_quantized"])
    assert summary["perplexity_quantized"] != summary["perplexity_unquantized"]
    model, _ = load_model(out)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"


def test_none_records_the_base_as_is(setup, tmp_path):
    out = tmp_path / "none"
    summary = quantize(QuantizeConfig(method="none", perplexity_samples=2), setup.base, setup.data, out)
    assert json.loads((out / RECORD_FILE).read_text())["method"] == "none"
    assert summary["perplexity_quantized"] == summary["perplexity_unquantized"]
    assert not (out / REPORT_PNG).exists()  # no layers measured: nothing to draw
    model, tok = load_model(out)
    base, _ = load_model(setup.base)
    assert torch.equal(logits(model, tok), logits(base, tok))


def test_cpu_workers_override_is_scoped(monkeypatch):
    monkeypatch.delenv("GPTQMODEL_CPU_WORKERS", raising=False)
    with cpu_workers():
        assert int(os.environ["GPTQMODEL_CPU_WORKERS"]) >= 2
    assert "GPTQMODEL_CPU_WORKERS" not in os.environ
    monkeypatch.setenv("GPTQMODEL_CPU_WORKERS", "1")
    with cpu_workers():
        assert os.environ["GPTQMODEL_CPU_WORKERS"] == "1"


BARS = """
from logbar import LogBar
from expert.quantize.gptq import quiet_progress
with quiet_progress():
    for _ in LogBar.shared().pb(range(200)).title("GPTQ layers"):  # as gptqmodel draws its bars
        pass
print("done", flush=True)
"""


@pytest.mark.parametrize("stdout", ["file", "file, LOGBAR_FORCE_PROGRESS=1", "terminal"])
def test_gptqmodel_bars_are_drawn_on_a_terminal_only(stdout, tmp_path):
    """Into a file (a log, a worker's pipe) every redraw of a bar lands as text: none are drawn
    there unless asked for; a terminal keeps its bars. Not in-process: logbar draws under pytest."""
    import pty
    import subprocess
    import sys
    from pathlib import Path

    env = _a_users_env()
    env.update(PYTHONPATH=str(Path(__file__).resolve().parents[2]), TERM="xterm-256color")
    if "FORCE" in stdout:
        env["LOGBAR_FORCE_PROGRESS"] = "1"
    out_file = tmp_path / "out"
    if stdout == "terminal":
        main, child = pty.openpty()
        done = subprocess.Popen([sys.executable, "-c", BARS], stdout=child, stderr=child, env=env)
        os.close(child)
        text, deadline = b"", time.monotonic() + 120
        while chunk := _read_pty(main, deadline):  # as it comes: a full terminal buffer would block the child
            text += chunk
        os.close(main)
        done.wait(timeout=10)
    else:
        with open(out_file, "wb") as out:
            done = subprocess.run([sys.executable, "-c", BARS], stdout=out, stderr=subprocess.STDOUT, env=env,
                                  timeout=120)
        text = out_file.read_bytes()
    assert done.returncode == 0 and b"done" in text, text[-2000:]
    drawn = text.count(b" of 200]")  # "[k of 200]": one a redraw (the title is styled letter by letter)
    assert (drawn > 20) == (stdout != "file"), (drawn, text[:2000])


def _a_users_env() -> dict[str, str]:
    """This environment less what logbar reads as "not a person at a terminal": it draws under pytest
    and turns its bars off by itself under a CI or an agent (CI=1, CLAUDE_*...), whatever TERM says.
    These cases are about what our TERM setting does, as a user at a terminal or behind a pipe sees it."""
    from logbar import terminal

    names = getattr(terminal, "_HEADLESS_ENV_VARS", frozenset({"CI", "GITHUB_ACTIONS", "GITLAB_CI", "BUILD_ID"}))
    prefixes = ("PYTEST_", "LOGBAR_", *getattr(terminal, "_HEADLESS_ENV_PREFIXES", ()))
    return {k: v for k, v in os.environ.items() if k not in names and not k.startswith(prefixes)}


def _read_pty(fd: int, deadline: float) -> bytes:
    import select

    if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
        return b""  # nothing more by the deadline: the assertions say what came
    try:
        return os.read(fd, 65536)
    except OSError:  # the child side closed: Linux reports EIO at the end
        return b""


def test_the_terminal_setting_is_scoped(monkeypatch):
    from expert.quantize import gptq

    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setattr(gptq, "_stdout_is_terminal", lambda: False)
    with gptq.quiet_progress():
        assert os.environ["TERM"] == "dumb"
    assert os.environ["TERM"] == "xterm"
    monkeypatch.setattr(gptq, "_stdout_is_terminal", lambda: True)
    with gptq.quiet_progress():
        assert os.environ["TERM"] == "xterm"


def test_checkpoint_is_streamed_only_when_large_for_the_machine(tmp_path, monkeypatch):
    from expert.quantize import gptq

    (tmp_path / "model.safetensors").write_bytes(b"\0" * 1000)
    monkeypatch.setattr(gptq, "_physical_memory", lambda: 1_000_000)
    assert gptq.offload_to_disk(tmp_path) is False  # a small model is loaded whole
    monkeypatch.setattr(gptq, "_physical_memory", lambda: 3000)
    assert gptq.offload_to_disk(tmp_path) is True  # over a quarter of RAM: block by block
    monkeypatch.setattr(gptq, "_physical_memory", lambda: 1_000_000)
    monkeypatch.setattr(gptq.torch.cuda, "is_available", lambda: True)
    assert gptq.offload_to_disk(tmp_path) is True  # with a GPU, gptqmodel's default: streamed


def test_reading_the_config_loads_no_torch():
    """`expert run` reads every stage's config before anything runs; a cached rerun runs nothing."""
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys; from expert.quantize import QuantizeConfig; print('torch' in sys.modules)"
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True)
    assert out.stdout.strip() == "False"


def _tokenizer(tmp_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer(tmp_path / "tok"))


def test_checkpoints_that_are_not_this_runs_are_removed_and_gptq_starts_over(setup, tmp_path, monkeypatch, caplog):
    from expert.quantize import gptq
    from expert.quantize.checkpoint import CHECKPOINT_DIR

    monkeypatch.setattr(gptq, "offload_to_disk", lambda model_dir: True)  # streamed: checkpoints apply
    stale = tmp_path / "work" / CHECKPOINT_DIR
    stale.mkdir(parents=True)  # a published generation whose files are gone: gptqmodel refuses it
    (stale / "CURRENT").write_text(json.dumps({"generations": ["0" * 64], "version": 1}))
    ticks = []
    with caplog.at_level("INFO", logger="expert.quantize"):
        quantize(QuantizeConfig(group_size=GROUP_SIZE, num_samples=64, perplexity_samples=0), setup.base,
                 setup.data, tmp_path / "out", lambda done, total: ticks.append(done), work_dir=tmp_path / "work")
    assert "are not this run's" in caplog.text and "GPTQ: layer 2/2 quantized" in caplog.text
    assert ticks == [1, 2, 3, 4, 5, 6]  # every layer quantized here
    assert (stale / "CURRENT").read_text() != json.dumps({"generations": ["0" * 64], "version": 1})
    ours, whole = load_file(tmp_path / "out" / "model.safetensors"), load_file(setup.gptq / "model.safetensors")
    assert all(torch.equal(ours[k], whole[k]) for k in whole)


def test_a_model_loaded_whole_keeps_no_checkpoints_and_the_stage_gives_its_work_folder(setup, tmp_path,
                                                                                       monkeypatch):
    import expert.quantize as quantize_package
    from expert.quantize.checkpoint import layer_checkpoint
    from expert.stages.tuning import Quantize

    whole = type("Loaded", (), {"quantize_config": type("Config", (), {"offload_to_disk": False})()})()
    assert layer_checkpoint(tmp_path, whole) is None and layer_checkpoint(None, whole) is None
    seen = {}
    monkeypatch.setattr(quantize_package, "quantize", lambda *a, **k: seen.update(k) or {})
    Quantize().produce(QuantizeConfig(), {"model": tmp_path, "data": tmp_path}, {}, tmp_path / "out",
                       work_dir=tmp_path / "work")
    assert seen["work_dir"] == tmp_path / "work"


def test_a_model_gptqmodel_cannot_checkpoint_is_quantized_without_checkpoints(setup, tmp_path, monkeypatch,
                                                                              caplog):
    # e.g. Mistral or Qwen2 on a GPU: gptqmodel 7.6 checkpoints llama and qwen3_moe only, and its
    # quantize() raises for any other model given a checkpoint config.
    from gptqmodel.looper import gptq_checkpoint

    from expert.quantize import gptq

    def refuse(model, **kwargs):
        raise NotImplementedError("checkpoint state adapters currently support llama and qwen3_moe")

    monkeypatch.setattr(gptq, "offload_to_disk", lambda model_dir: True)
    monkeypatch.setattr(gptq_checkpoint, "validate_checkpoint_support", refuse)
    with caplog.at_level("INFO", logger="expert.quantize"):
        quantize(QuantizeConfig(group_size=GROUP_SIZE, num_samples=64, perplexity_samples=0), setup.base,
                 setup.data, tmp_path / "out", work_dir=tmp_path / "work")
    assert "GPTQ keeps no layer checkpoints here (checkpoint state adapters currently support" in caplog.text
    assert not (tmp_path / "work").exists() and list((tmp_path / "out").glob("*.safetensors"))
