"""Whole training runs on a tiny Llama: learning, outputs, exact resume after a crash."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from expert.errors import DataError, ExpertError
from expert.train import TrainConfig, list_checkpoints, train
from expert.train.checkpoint import MARKER, STATE
from expert.train.data import read_split
from tests.expert.train_fixtures import WORDS, plain_load, write_toy_data, llama_dir, one_thread  # noqa: F401 (fixtures)

# 24 examples, micro-batch 2, 2 per step: 6 steps an epoch; 1.5 epochs = 9 steps, crossing an epoch.
RUN = dict(epochs=1.5, micro_batch_size=2, effective_batch_size=4, learning_rate=5e-3, warmup_steps=2,
           save_every_steps=2, lora_dropout=0.1)


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_toy_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference(llama_dir, data_dir, tmp_path_factory):
    """One uninterrupted run of RUN, with the progress calls it made."""
    root = tmp_path_factory.mktemp("reference")
    calls = []
    summary = train(TrainConfig(**RUN), llama_dir, data_dir, root / "out", root / "work",
                    progress=lambda done, total: calls.append((done, total)), device="cpu")
    return root / "out", summary, calls


def crash_at(step):
    def progress(done, total):
        if done == step:
            raise Crash(f"killed after step {done}")
    return progress


def adapter(path):
    return load_file(path / "adapter_model.safetensors")


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_run_writes_every_output(reference):
    out, summary, calls = reference
    assert calls == [(step, 9) for step in range(1, 10)]
    assert [step for step, _ in list_checkpoints(out)] == [2, 4, 6, 8, 9]
    assert (out / "final" / "adapter_config.json").is_file()
    assert_bitwise_equal(adapter(out / "final"), adapter(out / "checkpoints" / "step-000009"))
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 10))
    assert [r["step"] for r in records if "dev_loss" in r] == [2, 4, 6, 8, 9]
    assert all(r["tokens_per_s"] > 0 and r["memory_mb"] > 0 for r in records if "loss" in r)
    steps = [r for r in records if "loss" in r]  # one step a record: its own tokens and time
    assert all(r["tokens"] > 0 and abs(r["tokens"] / r["seconds"] - r["tokens_per_s"]) <= 0.01 * r["tokens_per_s"]
               for r in steps)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = json.loads((out / "summary.json").read_text())
    assert written["steps"] == summary["steps"] == 9 and written["epochs"] == 1.5
    assert set(written["dev_loss"]) == {"2", "4", "6", "8", "9"}
    assert 0 <= written["padding_fraction"] < written["padding_fraction_unbucketed"]
    marker = json.loads((out / "checkpoints" / "step-000004" / MARKER).read_text())
    assert marker["dev_loss"] == written["dev_loss"]["4"] and marker["step"] == 4


def test_loss_falls_and_dev_answers_are_learned(llama_dir, data_dir, tmp_path):
    config = TrainConfig(epochs=6, micro_batch_size=4, effective_batch_size=8, learning_rate=2e-2,
                         warmup_steps=2, save_every_steps=100, target_modules="all-linear", lora_dropout=0.0)
    summary = train(config, llama_dir, data_dir, tmp_path / "out", tmp_path / "work", device="cpu")
    records = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses
    assert summary["final_dev_loss"] < 0.5 * losses[0]
    # The tuned model now prefers the right answer on the dev questions it never trained on.
    from peft import PeftModel

    base, tok = plain_load(llama_dir)
    model = PeftModel.from_pretrained(base, tmp_path / "out" / "final").eval()
    choice_ids = [tok(" " + answer)["input_ids"][-1] for answer in WORDS]
    dev = read_split(data_dir / "dev.parquet")
    assert set(dev["answer"]) == set(WORDS)
    for prompt, answer in zip(dev["prompt"], dev["answer"]):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([tok(prompt)["input_ids"]])).logits[0, -1]
        assert list(WORDS)[int(logits[choice_ids].argmax())] == answer


def test_resume_after_crash_continues_and_matches_uninterrupted_run(reference, llama_dir, data_dir, tmp_path):
    out, _, _ = reference
    config = TrainConfig(**RUN)
    with pytest.raises(Crash):
        train(config, llama_dir, data_dir, tmp_path / "out", tmp_path / "work", progress=crash_at(5), device="cpu")
    assert [s for s, _ in list_checkpoints(tmp_path / "work")] == [2, 4]
    calls = []
    summary = train(config, llama_dir, data_dir, tmp_path / "out", tmp_path / "work",
                    progress=lambda done, total: calls.append(done), device="cpu")
    assert calls[0] == 4 and calls[1:] == [5, 6, 7, 8, 9]  # from the checkpoint, not from step 0
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert written["resumed_from"] == [4] and summary["steps"] == 9
    assert_bitwise_equal(adapter(tmp_path / "out" / "final"), adapter(out / "final"))
    assert_bitwise_equal(adapter(tmp_path / "out" / "checkpoints" / "step-000006"),
                         adapter(out / "checkpoints" / "step-000006"))
    ours = (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()
    theirs = (out / "train_log.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k not in ("tokens_per_s", "seconds", "memory_mb")}
                           for x in lines]
    assert strip(ours) == strip(theirs)  # no duplicated or missing steps, same losses


def test_resume_keeps_the_steps_not_yet_logged_when_logging_every_few_steps(reference, llama_dir, data_dir,
                                                                          tmp_path):
    # log_every_steps 3, checkpoints every 2: the checkpoint of step 4 holds step 4's loss, not yet
    # logged, and the record of step 6 must average steps 4, 5 and 6 as an uninterrupted run does.
    per_step = {r["step"]: r["loss"] for r in map(json.loads, (reference[0] / "train_log.jsonl").read_text()
                                                  .splitlines()) if "loss" in r}  # the same losses, logged each step
    config = TrainConfig(**RUN, log_every_steps=3)
    with pytest.raises(Crash):
        train(config, llama_dir, data_dir, tmp_path / "out", tmp_path / "work", progress=crash_at(5), device="cpu")
    older = tmp_path / "older_work"  # as a checkpoint written before the window was kept
    shutil.copytree(tmp_path / "work", older)
    state_file = older / "checkpoints" / "step-000004" / STATE
    state_file.write_text(json.dumps({k: v for k, v in json.loads(state_file.read_text()).items()
                                      if k != "log_window"}))
    train(config, llama_dir, data_dir, tmp_path / "out", tmp_path / "work", device="cpu")
    logged = [(r["step"], r["loss"]) for r in map(json.loads, (tmp_path / "out" / "train_log.jsonl").read_text()
                                                  .splitlines()) if "loss" in r]
    assert logged == [(end, sum(per_step[s] for s in range(end - 2, end + 1)) / 3) for end in (3, 6, 9)]
    summary = train(config, llama_dir, data_dir, tmp_path / "older_out", older, device="cpu")
    assert summary["steps"] == 9
    assert json.loads((tmp_path / "older_out" / "summary.json").read_text())["resumed_from"] == [4]


def test_checkpoint_without_marker_is_ignored(reference, llama_dir, data_dir, tmp_path):
    out, _, _ = reference
    config = TrainConfig(**RUN)
    with pytest.raises(Crash):
        train(config, llama_dir, data_dir, tmp_path / "out", tmp_path / "work", progress=crash_at(5), device="cpu")
    checkpoints = tmp_path / "work" / "checkpoints"
    (checkpoints / "step-000004" / MARKER).unlink()  # as if killed while writing it
    (checkpoints / ".step-000006.tmp").mkdir()  # a temp folder of a kill mid-save
    (checkpoints / ".step-000006.tmp" / "adapter_model.safetensors").write_bytes(b"half")
    summary = train(config, llama_dir, data_dir, tmp_path / "out", tmp_path / "work", device="cpu")
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert written["resumed_from"] == [2] and summary["steps"] == 9
    assert_bitwise_equal(adapter(tmp_path / "out" / "final"), adapter(out / "final"))


def test_checkpoints_of_another_config_are_not_resumed(llama_dir, data_dir, tmp_path):
    first = TrainConfig(**{**RUN, "max_steps": 2})
    train(first, llama_dir, data_dir, tmp_path / "out1", tmp_path / "work", device="cpu")
    second = TrainConfig(**{**RUN, "max_steps": 2, "learning_rate": 1e-3})
    train(second, llama_dir, data_dir, tmp_path / "out2", tmp_path / "work", device="cpu")
    assert json.loads((tmp_path / "out2" / "summary.json").read_text())["resumed_from"] == []
    assert not torch.equal(*(adapter(tmp_path / o / "final")["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
                            for o in ("out1", "out2")))


def test_a_second_run_on_the_same_work_dir_is_refused(llama_dir, data_dir, tmp_path):
    fcntl = pytest.importorskip("fcntl")
    (tmp_path / "work").mkdir()
    with open(tmp_path / "work" / ".lock", "w") as held:  # as a run in another process holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ExpertError, match="another training run is using"):
            train(TrainConfig(**RUN), llama_dir, data_dir, tmp_path / "out", tmp_path / "work", device="cpu")
    assert not list_checkpoints(tmp_path / "work")


def test_missing_dev_split_says_how_to_skip_it(llama_dir, tmp_path):
    data = write_toy_data(tmp_path / "data")
    (data / "dev.parquet").unlink()
    with pytest.raises(DataError, match="dev.parquet does not exist.*dev_loss: false"):
        train(TrainConfig(**RUN), llama_dir, data, tmp_path / "out", tmp_path / "work", device="cpu")


def test_resume_with_8bit_optimizer_matches_uninterrupted_run(llama_dir, data_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    # all-linear: the MLP's LoRA A matrices (4 x 128 = 512) stay under bitsandbytes' 4096-value
    # threshold, so a larger rank puts some state in 8 bits: r=32 -> 32 x 128 = 4096.
    config = TrainConfig(**{**RUN, "optimizer": "adamw_8bit", "lora_r": 32, "target_modules": "all-linear",
                            "max_steps": 6})
    train(config, llama_dir, data_dir, tmp_path / "ref", tmp_path / "ref_work", device="cpu")
    with pytest.raises(Crash):
        train(config, llama_dir, data_dir, tmp_path / "out", tmp_path / "work", progress=crash_at(3), device="cpu")
    train(config, llama_dir, data_dir, tmp_path / "out", tmp_path / "work", device="cpu")
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["resumed_from"] == [2]
    state = load_file(tmp_path / "out" / "checkpoints" / "step-000006" / "optimizer.safetensors")
    assert any(t.dtype == torch.uint8 for t in state.values())  # 8-bit state really was saved
    assert_bitwise_equal(adapter(tmp_path / "out" / "final"), adapter(tmp_path / "ref" / "final"))


def test_precision_picks_what_the_matmuls_compute_in(tmp_path, monkeypatch):
    from expert.train import step

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    assert step.cpu_has_native_bf16(str(cpuinfo))
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    assert not step.cpu_has_native_bf16(str(cpuinfo))
    assert not step.cpu_has_native_bf16(str(tmp_path / "missing"))

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    for native in (True, False):
        monkeypatch.setattr(step, "cpu_has_native_bf16", lambda native=native: native)
        monkeypatch.setattr(step, "gpu_has_bf16", lambda native=native: native)
        for device in (cpu, gpu):
            assert step.autocast_dtype("auto", device) == (torch.bfloat16 if native else None)
            assert step.autocast_dtype("float32", device) is None
            assert step.autocast_dtype("bfloat16", device) == torch.bfloat16


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_a_run_computes_in_its_precision_and_says_so(llama_dir, data_dir, tmp_path, precision, monkeypatch):
    """The matmuls of training steps and dev losses run in the configured precision (seen by a hook on
    a projection, with the frozen weight's stored dtype: bf16 under autocast, expert/train/frozen.py),
    and summary.json records it; bf16 learns as float32 does."""
    import expert.train.loop as loop

    seen = set()
    attach = loop.attach_lora

    def attach_and_watch(model, config):
        model = attach(model, config)
        proj = model.get_base_model().model.layers[0].mlp.up_proj.base_layer
        proj.register_forward_hook(lambda module, args, out: seen.add((out.dtype, module.weight.dtype)))
        return model

    monkeypatch.setattr(loop, "attach_lora", attach_and_watch)
    config = TrainConfig(**{**RUN, "epochs": 1, "precision": precision, "target_modules": "all-linear"})
    summary = train(config, llama_dir, data_dir, tmp_path / "out", tmp_path / "work", device="cpu")
    dtype = torch.float32 if precision == "float32" else torch.bfloat16
    assert seen == {(dtype, dtype)}
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert written["precision"] == ("float32" if precision == "float32" else "bfloat16 autocast")
    assert summary["final_dev_loss"] < written["dev_loss"]["2"]  # it learns


_SAVE_ADAPTER = """
import sys
from pathlib import Path
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from expert.train import TrainConfig
from expert.train.checkpoint import save_checkpoint
from expert.train.lora import attach_lora, make_optimizer, make_scheduler
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=4))
config = TrainConfig(lora_r=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"])
model = attach_lora(model, config)
optimizer = make_optimizer(config, model)
save_checkpoint(Path(sys.argv[1]), 1, model, optimizer, make_scheduler(config, optimizer, 2), {}, {})
print(list(set(config.target_modules)))  # the order this process's string hashing gives a set
"""


def test_the_same_adapter_is_saved_byte_for_byte_whatever_the_hash_seed(tmp_path):
    # PEFT writes target_modules, a set, in an order that string hashing changes between
    # processes: the same adapter then got another content digest on every run, and a rebuilt
    # train stage made every stage after it rerun.
    import os
    import subprocess
    import sys

    configs, set_orders = set(), set()
    for seed in range(2):
        out = tmp_path / str(seed)
        done = subprocess.run([sys.executable, "-c", _SAVE_ADAPTER, str(out)], check=True, timeout=300,
                              env={**os.environ, "PYTHONHASHSEED": str(seed)}, capture_output=True, text=True)
        set_orders.add(done.stdout.strip().splitlines()[-1])
        saved = out / "step-000001"
        configs.add(((saved / "adapter_config.json").read_text(), (saved / "adapter_model.safetensors").read_bytes()))
    assert len(set_orders) == 2, set_orders  # the two processes did order the set differently
    assert len(configs) == 1
    assert json.loads(configs.pop()[0])["target_modules"] == ["k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


# ---------------------------------------------------------------- what a crash can leave behind

def crash_run(config, llama_dir, data_dir, root, step=5):
    """Train `config` in root/work until the crash after `step` (checkpoints every 2 steps)."""
    with pytest.raises(Crash):
        train(config, llama_dir, data_dir, root / "out", root / "work", progress=crash_at(step), device="cpu")
    return root / "work" / "checkpoints"


def empty_file(folder):
    (folder / "optimizer.safetensors").write_bytes(b"")  # what an un-fsynced file can be after a power loss


def flip_last_byte(folder):
    path = folder / "adapter_model.safetensors"  # same size, one weight changed
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def tear_marker(folder):
    path = folder / MARKER
    path.write_text(path.read_text()[:40])


@pytest.mark.parametrize("damage", [empty_file, flip_last_byte, tear_marker])
def test_a_damaged_last_checkpoint_is_set_aside_and_the_one_before_resumed(reference, llama_dir, data_dir,
                                                                         tmp_path, caplog, damage):
    checkpoints = crash_run(TrainConfig(**RUN), llama_dir, data_dir, tmp_path)
    damage(checkpoints / "step-000004")
    with caplog.at_level("WARNING", logger="expert"):
        summary = train(TrainConfig(**RUN), llama_dir, data_dir, tmp_path / "out", tmp_path / "work", device="cpu")
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["resumed_from"] == [2]
    assert summary["steps"] == 9
    assert_bitwise_equal(adapter(tmp_path / "out" / "final"), adapter(reference[0] / "final"))
    assert "step-000004" in caplog.text and ".bad-step-000004" in caplog.text
    assert (checkpoints / ".bad-step-000004").is_dir()  # kept for a look, never tried again
    assert [s for s, _ in list_checkpoints(tmp_path / "out")] == [2, 4, 6, 8, 9]  # step 4 made again
    assert not list((tmp_path / "out" / "checkpoints").glob(".bad-*"))


def test_an_earlier_checkpoint_damaged_during_the_run_stays_out_of_the_outputs(llama_dir, data_dir, tmp_path, caplog):
    """Selection scores every checkpoint: one that no longer reads back whole is set aside, not copied."""
    def damage_step_2(done, total):
        if done == 5:
            flip_last_byte(tmp_path / "work" / "checkpoints" / "step-000002")

    with caplog.at_level("WARNING", logger="expert"):
        train(TrainConfig(**RUN), llama_dir, data_dir, tmp_path / "out", tmp_path / "work", progress=damage_step_2,
              device="cpu")
    assert [s for s, _ in list_checkpoints(tmp_path / "out")] == [4, 6, 8, 9]
    assert "step-000002 is damaged" in caplog.text and "left it out of the outputs" in caplog.text
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["checkpoints"] == [
        "step-000004", "step-000006", "step-000008", "step-000009"]


def as_older_version_wrote_it(folder):
    """A checkpoint as the version before file sizes and precision were recorded wrote it."""
    marker = json.loads((folder / MARKER).read_text())
    del marker["files"]
    marker["config"]["log_every_steps"] = 1  # that version keyed it
    (folder / MARKER).write_text(json.dumps(marker))
    state = json.loads((folder / STATE).read_text())
    del state["precision"]
    (folder / STATE).write_text(json.dumps(state))


def test_checkpoints_of_the_older_format_resume_and_a_damaged_one_is_still_caught(reference, llama_dir, data_dir,
                                                                                  tmp_path):
    checkpoints = crash_run(TrainConfig(**RUN), llama_dir, data_dir, tmp_path)
    for step in ("step-000002", "step-000004"):
        as_older_version_wrote_it(checkpoints / step)
    older = tmp_path / "older"
    shutil.copytree(tmp_path / "work", older / "work")

    train(TrainConfig(**RUN), llama_dir, data_dir, tmp_path / "out", tmp_path / "work", device="cpu")
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert written["resumed_from"] == [4]
    assert written["precision"].endswith("from step 5 (steps 1-4: not recorded)")  # no claim it cannot back
    assert_bitwise_equal(adapter(tmp_path / "out" / "final"), adapter(reference[0] / "final"))

    (older / "work" / "checkpoints" / "step-000004" / "rng.safetensors").write_bytes(b"")  # no sizes to compare
    train(TrainConfig(**RUN), llama_dir, data_dir, older / "out", older / "work", device="cpu")
    assert json.loads((older / "out" / "summary.json").read_text())["resumed_from"] == [2]
    assert (older / "work" / "checkpoints" / ".bad-step-000004").is_dir()


def test_checkpoint_files_are_fsynced_before_the_rename_and_their_sizes_and_digests_recorded(tmp_path, monkeypatch):
    import hashlib
    import os
    from pathlib import Path

    from transformers import LlamaConfig, LlamaForCausalLM

    from expert.train import checkpoint
    from expert.train.lora import attach_lora, make_optimizer, make_scheduler

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc/self/fd to name what was fsynced")
    events = []
    real_fsync, real_rename = os.fsync, Path.rename
    monkeypatch.setattr(checkpoint.os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(Path, "rename", lambda self, target: events.append(("rename", str(self), str(target)))
                        or real_rename(self, target))
    config = TrainConfig(lora_r=2)
    model = attach_lora(LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                     num_hidden_layers=1, num_attention_heads=4)), config)
    optimizer = make_optimizer(config, model)
    final = checkpoint.save_checkpoint(tmp_path / "checkpoints", 3, model, optimizer,
                                       make_scheduler(config, optimizer, 4), {}, {})

    renames = [i for i, e in enumerate(events) if e[0] == "rename"]
    assert len(renames) == 1 and events[renames[0]][2] == str(final)
    tmp = events[renames[0]][1]
    synced_before = {e[1] for e in events[:renames[0]] if e[0] == "fsync"}
    assert {f"{tmp}/{p.name}" for p in final.iterdir()} | {tmp} <= synced_before
    assert ("fsync", str(final.parent)) in events[renames[0]:]
    recorded = json.loads((final / MARKER).read_text())["files"]
    assert set(recorded) == {"adapter_model.safetensors", "adapter_config.json", "optimizer.safetensors",
                             "rng.safetensors"}  # not trainer_state.json: it holds timings
    for name, desc in recorded.items():
        data = (final / name).read_bytes()
        assert desc == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert checkpoint.verify_checkpoint(final) is None
    (final / "rng.safetensors").write_bytes((final / "rng.safetensors").read_bytes()[:-1])
    assert "rng.safetensors has" in checkpoint.verify_checkpoint(final)


def tear_log(work):
    log_file = work / "train_log.jsonl"
    text = log_file.read_text()
    log_file.write_text(text[:len(text) - len(text.splitlines()[-1]) // 2 - 1])  # the last line cut in half


def test_a_torn_last_line_of_the_train_log_does_not_stop_the_resume(reference, llama_dir, data_dir, tmp_path, caplog):
    crash_run(TrainConfig(**RUN), llama_dir, data_dir, tmp_path)
    tear_log(tmp_path / "work")
    with caplog.at_level("WARNING", logger="expert"):
        train(TrainConfig(**RUN), llama_dir, data_dir, tmp_path / "out", tmp_path / "work", device="cpu")
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["resumed_from"] == [4]
    assert str(tmp_path / "work" / "train_log.jsonl") in caplog.text
    strip = lambda path: [{k: v for k, v in json.loads(x).items() if k not in ("tokens_per_s", "seconds", "memory_mb")}
                          for x in path.read_text().splitlines()]
    assert strip(tmp_path / "out" / "train_log.jsonl") == strip(reference[0] / "train_log.jsonl")


@pytest.mark.parametrize("tail", [b'{"step": 5, "lo', b"\0" * 64, b'{"step": 5, "loss": \xff\xfe}\n', b"[]\n"],
                         ids=["half a line", "NUL bytes", "not UTF-8", "not a record"])
def test_the_log_is_read_up_to_its_first_line_that_does_not_decode(tmp_path, tail):
    from expert.train.logging import _truncate_jsonl

    path = tmp_path / "train_log.jsonl"
    good = [{"step": 1, "loss": 2.0}, {"step": 2, "dev_loss": 1.5}, {"step": 3, "loss": 1.0}]
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in good) + tail + b'{"step": 4}\n')
    assert _truncate_jsonl(path, 2) == good[:2]
    assert [json.loads(line) for line in path.read_text().splitlines()] == good[:2]


def native_bf16(monkeypatch, native):
    """As on a machine whose CPU has (or lacks) native bf16 matmuls, whatever this one has."""
    from expert.train import step

    monkeypatch.setattr(step, "cpu_has_native_bf16", lambda: native)


def test_a_resume_keeps_computing_in_the_precision_of_its_checkpoint(llama_dir, data_dir, tmp_path, monkeypatch):
    config = TrainConfig(**{**RUN, "max_steps": 6})  # precision auto
    native_bf16(monkeypatch, False)
    train(config, llama_dir, data_dir, tmp_path / "ref" / "out", tmp_path / "ref" / "work", device="cpu")
    crash_run(config, llama_dir, data_dir, tmp_path, step=3)  # float32 on the machine without bf16

    native_bf16(monkeypatch, True)  # resumed where auto would pick bf16
    train(config, llama_dir, data_dir, tmp_path / "out", tmp_path / "work", device="cpu")
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert written["resumed_from"] == [2] and written["precision"] == "float32"
    assert_bitwise_equal(adapter(tmp_path / "out" / "final"), adapter(tmp_path / "ref" / "out" / "final"))


def test_bf16_checkpoints_are_not_resumed_in_float32_and_the_error_says_what_to_do(llama_dir, data_dir, tmp_path,
                                                                                  monkeypatch):
    config = TrainConfig(**{**RUN, "max_steps": 6})
    native_bf16(monkeypatch, True)
    checkpoints = crash_run(config, llama_dir, data_dir, tmp_path, step=3)

    native_bf16(monkeypatch, False)
    with pytest.raises(ExpertError) as error:
        train(config, llama_dir, data_dir, tmp_path / "out", tmp_path / "work", device="cpu")
    message = str(error.value)
    assert str(checkpoints / "step-000002") in message and "bfloat16" in message
    assert "--force train" in message and "train.precision" in message
    assert [s for s, _ in list_checkpoints(tmp_path / "work")] == [2]  # nothing thrown away

    native_bf16(monkeypatch, True)  # back on a machine with bf16: it resumes
    train(config, llama_dir, data_dir, tmp_path / "out", tmp_path / "work", device="cpu")
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert written["resumed_from"] == [2] and written["precision"] == "bfloat16 autocast"


def test_log_every_steps_is_not_in_the_key_and_a_new_value_resumes(llama_dir, data_dir, tmp_path):
    from expert.stages.tuning import Train

    assert TrainConfig(log_every_steps=5).canonical() == TrainConfig().canonical()
    assert Train().key_config(TrainConfig(log_every_steps=5)) == Train().key_config(TrainConfig())
    # Not the same computation (other dropout masks, gradients equal only to rounding): stays keyed.
    assert TrainConfig(lean_activations=False).canonical() != TrainConfig().canonical()

    crash_run(TrainConfig(**{**RUN, "max_steps": 6}), llama_dir, data_dir, tmp_path, step=3)
    train(TrainConfig(**{**RUN, "max_steps": 6, "log_every_steps": 3}), llama_dir, data_dir, tmp_path / "out",
          tmp_path / "work", device="cpu")
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["resumed_from"] == [2]
    logged = [r["step"] for r in map(json.loads, (tmp_path / "out" / "train_log.jsonl").read_text().splitlines())
              if "loss" in r]
    assert logged == [1, 2, 3, 6]  # every step before the resume, every third after


def test_a_resumed_run_keeps_the_bucket_size_its_checkpoint_recorded(llama_dir, data_dir, tmp_path, monkeypatch):
    # The data order depends on the bucket size: a run resumed from a checkpoint written before
    # buckets grew with the epoch (no "bucket_batches" in it) must go on with the 8 it had.
    from expert.train import loop
    from expert.train.data import BatchPlan

    seen = []

    class Recording(BatchPlan):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(self.bucket_batches)

    monkeypatch.setattr(loop, "BatchPlan", Recording)
    config = TrainConfig(**{**RUN, "max_steps": 2})
    train(config, llama_dir, data_dir, tmp_path / "out", tmp_path / "work", device="cpu")
    (step, path), = list_checkpoints(tmp_path / "out")
    assert json.loads((path / STATE).read_text())["bucket_batches"] == seen[0] == 8  # 6 an epoch: the least
    real = loop.read_state
    for recorded, expected in ((13, 13), (None, 8)):
        monkeypatch.setattr(loop, "read_state", lambda p, r=recorded: {
            **{k: v for k, v in real(p).items() if k != "bucket_batches"},
            **({"bucket_batches": r} if r else {})})
        train(config, llama_dir, data_dir, tmp_path / f"out{recorded}", tmp_path / "work", device="cpu")
        assert seen[-1] == expected
