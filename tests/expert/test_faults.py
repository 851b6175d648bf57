"""Faults injected on purpose: kill -9, a flipped byte, a full disk, two runs at once.

Each test is one line of the README's reliability table: what was tried, what happened, and
that nothing was lost. Processes are real (subprocesses killed with SIGKILL), so what survives
is what the disk holds, not what Python's cleanup would have tidied up.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from expert import artifacts
from expert.artifacts import MANIFEST, ArtifactStore, StageRequest, verify
from expert.cli import main
from expert.errors import ExpertError
from expert.train import TrainConfig, list_checkpoints, train
from tests.expert.quantize_fixtures import tiny_setup
from tests.expert.train_fixtures import llama_dir, one_thread, write_toy_data  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[2]
# 24 examples, 2 per step: 9 steps over 1.5 epochs, a checkpoint every 2 steps (and at 9).
RUN = dict(epochs=1.5, micro_batch_size=2, effective_batch_size=4, learning_rate=5e-3, warmup_steps=2,
           save_every_steps=2, lora_dropout=0.1)
DEADLINE_S = 300  # only bounds a hung child; nothing is timed


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def spawn(code: str, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=REPO, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=DEADLINE_S)
    assert proc.returncode == 0, err[-3000:]
    return out


def wait_for(predicate, proc: subprocess.Popen) -> None:
    """Poll until `predicate()` holds; fail if the child exits or hangs first."""
    deadline = time.monotonic() + DEADLINE_S
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"child exited ({proc.returncode}) first: {proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, "child hung"
        time.sleep(0.05)


def kill9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=DEADLINE_S)
    assert proc.returncode == -signal.SIGKILL


# ---------------------------------------------------------------- kill -9 during training

TRAIN_SCRIPT = """
import json, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from expert.train import TrainConfig, train
model, data, root, progress_file = map(Path, sys.argv[1:5])
pause = float(sys.argv[6])
def progress(done, total):
    progress_file.write_text(str(done))
    time.sleep(pause)  # gives the parent a window to kill at a step of its choosing
summary = train(TrainConfig(**json.loads(sys.argv[5])), model, data, root / "out", root / "work",
                progress=progress, device="cpu")
print(json.dumps(summary))
"""


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    return write_toy_data(tmp_path_factory.mktemp("data"))


def _train_and_kill(llama_dir, toy_data, tmp_path, kill_after: int) -> tuple:
    """Start the toy run in a process of its own and kill -9 it once it has done `kill_after` steps;
    the arguments that run it again."""
    progress = tmp_path / "progress"
    args = (llama_dir, toy_data, tmp_path, progress, json.dumps(RUN))
    proc = spawn(TRAIN_SCRIPT, *args, 0.3)

    def reached() -> bool:
        # One read: the child rewrites the file (truncate, then write), so a second read can find it
        # empty (CI once did: ValueError on int('')).
        text = progress.read_text() if progress.is_file() else ""
        return text.strip().isdigit() and int(text) >= kill_after

    wait_for(reached, proc)
    kill9(proc)
    return args


def _assert_ends_as_an_uninterrupted_run(llama_dir, toy_data, tmp_path, kill_after: int) -> None:
    reference = tmp_path / "reference"
    train(TrainConfig(**RUN), llama_dir, toy_data, reference / "out", reference / "work", device="cpu")
    ours, theirs = load_file(tmp_path / "out" / "final" / "adapter_model.safetensors"), \
        load_file(reference / "out" / "final" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and ours
    for name in ours:  # tolerance 0: bitwise identical on the CPU
        assert (ours[name] == theirs[name]).all(), f"{name} differs (killed after step {kill_after})"


def test_training_killed_with_sigkill_resumes_from_its_last_checkpoint_bit_for_bit(llama_dir, toy_data, tmp_path):
    kill_after = random.Random().randint(3, 8)  # a random step; printed on failure
    args = _train_and_kill(llama_dir, toy_data, tmp_path, kill_after)
    assert not (tmp_path / "out").exists(), "outputs are written only at the end"
    done = [step for step, _ in list_checkpoints(tmp_path / "work")]
    assert done and done[-1] >= 2, f"killed after step {kill_after}: complete checkpoints {done}"

    finish(spawn(TRAIN_SCRIPT, *args, 0))  # the same command again
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["resumed_from"] == [done[-1]], f"killed after step {kill_after}"
    assert summary["steps"] == 9
    _assert_ends_as_an_uninterrupted_run(llama_dir, toy_data, tmp_path, kill_after)


def test_kill_then_a_damaged_last_checkpoint_and_a_torn_log_resume_from_the_checkpoint_before(llama_dir, toy_data,
                                                                                              tmp_path):
    # What a power loss can leave after the kill: the newest checkpoint's marker and rename kept but
    # a tensor file empty (no fsync before), and the log's last line cut in half.
    kill_after = random.Random().randint(4, 8)  # a random step; printed on failure
    args = _train_and_kill(llama_dir, toy_data, tmp_path, kill_after)
    done = list_checkpoints(tmp_path / "work")
    assert len(done) >= 2, f"killed after step {kill_after}: complete checkpoints {done}"
    (done[-1][1] / "optimizer.safetensors").write_bytes(b"")
    log_file = tmp_path / "work" / "train_log.jsonl"
    log_file.write_text(log_file.read_text()[:-20])

    finish(spawn(TRAIN_SCRIPT, *args, 0))  # the same command again
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["resumed_from"] == [done[-2][0]], f"killed after step {kill_after}"
    assert (done[-1][1].parent / f".bad-{done[-1][1].name}").is_dir()
    _assert_ends_as_an_uninterrupted_run(llama_dir, toy_data, tmp_path, kill_after)


# ---------------------------------------------------------------- kill -9 during GPTQ

GPTQ_SCRIPT = """
import os, signal, sys
from pathlib import Path
from expert.quantize import QuantizeConfig, gptq, quantize
gptq.offload_to_disk = lambda model_dir: True  # streamed, as on a GPU or for a large model
base, data, out, work = map(Path, sys.argv[1:5])
def progress(done, total):
    if done == 3:  # the tiny Llama's second and last layer is quantized, the first committed
        os.kill(os.getpid(), signal.SIGKILL)
quantize(QuantizeConfig(group_size=32, num_samples=64, perplexity_samples=0), base, data, out, progress,
         work_dir=work)
"""


def test_gptq_killed_after_a_layer_continues_after_it_and_ends_bit_for_bit(tmp_path, tmp_path_factory, monkeypatch):
    from expert.quantize import QuantizeConfig, gptq, quantize

    setup = tiny_setup(tmp_path_factory)  # its GPTQ folder: the same settings, never interrupted
    proc = spawn(GPTQ_SCRIPT, setup.base, setup.data, tmp_path / "killed", tmp_path / "work")
    proc.communicate(timeout=DEADLINE_S)
    assert proc.returncode == -signal.SIGKILL

    monkeypatch.setattr(gptq, "offload_to_disk", lambda model_dir: True)
    ticks = []
    quantize(QuantizeConfig(group_size=32, num_samples=64, perplexity_samples=0), setup.base, setup.data,
             tmp_path / "out", lambda done, total: ticks.append((done, total)), work_dir=tmp_path / "work")
    # 4 steps + one per layer; (2, 6), the first layer, was done by the killed run
    assert ticks == [(1, 6), (3, 6), (4, 6), (5, 6), (6, 6)]
    report = json.loads((tmp_path / "out" / "quantization_report.json").read_text())
    assert report["resumed_at_layer"] == 2 and "GPTQ resumed at layer | 2" in \
        (tmp_path / "out" / "quantization_report.md").read_text()
    resumed, whole = load_file(tmp_path / "out" / "model.safetensors"), load_file(setup.gptq / "model.safetensors")
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)


GPTQ_STOP_SCRIPT = """
import logging, os, signal, sys
from pathlib import Path
from expert.errors import ExpertError
from expert.quantize import QuantizeConfig, gptq, quantize
logging.basicConfig(level=logging.WARNING, format="%(message)s")
gptq.offload_to_disk = lambda model_dir: True  # streamed, with layer checkpoints
base, data, out, work = map(Path, sys.argv[1:5])
sig, before, times = int(sys.argv[5]), sys.argv[6], int(sys.argv[7])
# what was there before gptqmodel took the signal: Python's Ctrl-C (a background test runner may
# have left SIGINT ignored), the default (SIGTERM), ignored, or `expert run`'s hangup routing
signal.signal(sig, {"python": signal.default_int_handler, "default": signal.SIG_DFL, "ignored": signal.SIG_IGN,
                    "hangup": signal.SIG_DFL}[before])
if before == "hangup":
    from flows.hangup import stop_on_hangup
    stop_on_hangup()  # SIGHUP goes where SIGTERM goes: gptqmodel's handler, then the default
def progress(done, total):
    if done == 2:  # the first of the tiny Llama's two layers is quantized, not yet committed
        for _ in range(times):
            os.kill(os.getpid(), sig)
try:
    quantize(QuantizeConfig(group_size=32, num_samples=64, perplexity_samples=0), base, data, out, progress,
             work_dir=work)
except KeyboardInterrupt:
    sys.exit(130)
except ExpertError as exc:
    print(exc, file=sys.stderr)
    sys.exit(2)
"""


@pytest.mark.parametrize("sig, before, code, times", [(signal.SIGINT, "python", 130, 1),
                                                      (signal.SIGTERM, "default", -signal.SIGTERM, 1),
                                                      (signal.SIGTERM, "ignored", 2, 1),
                                                      (signal.SIGHUP, "hangup", -signal.SIGHUP, 1),
                                                      (signal.SIGINT, "python", 130, 2)],
                         ids=["ctrl-c", "sigterm", "ignored", "hangup", "ctrl-c-twice"])
def test_a_stop_during_gptq_commits_the_layer_then_ends_as_that_signal_would(sig, before, code, times, tmp_path,
                                                                              tmp_path_factory, monkeypatch):
    """gptqmodel takes SIGINT and SIGTERM while it checkpoints, and ended with a RuntimeError
    (CheckpointStopped) once the layer in progress was committed: the pipeline saw a failure.
    A second stop quits at once, without that layer (on a large model, tens of seconds sooner)."""
    from expert.quantize import QuantizeConfig, gptq, quantize

    setup = tiny_setup(tmp_path_factory)
    proc = spawn(GPTQ_STOP_SCRIPT, setup.base, setup.data, tmp_path / "stopped", tmp_path / "work", int(sig), before,
                 times)
    _, err = proc.communicate(timeout=DEADLINE_S)
    assert proc.returncode == code, err[-3000:]
    name = signal.Signals(sig).name
    assert f"GPTQ: {name}: stopping once the layer in progress is committed" in err, err[-3000:]
    assert f"GPTQ: stopped, its layers committed to {tmp_path / 'work'}" in err
    assert (f"GPTQ: {name} again: quitting now; the layer in progress is dropped" in err) == (times == 2), err[-3000:]
    if before == "ignored":
        assert "GPTQ stopped on a signal (checkpoint committed; resume from step 1)" in err
    assert not (tmp_path / "stopped" / "model.safetensors").exists()
    if sig != signal.SIGINT:
        return
    # The same command again continues after what was committed and ends as an uninterrupted run.
    monkeypatch.setattr(gptq, "offload_to_disk", lambda model_dir: True)
    quantize(QuantizeConfig(group_size=32, num_samples=64, perplexity_samples=0), setup.base, setup.data,
             tmp_path / "out", work_dir=tmp_path / "work")
    resumed_at = json.loads((tmp_path / "out" / "quantization_report.json").read_text()).get("resumed_at_layer")
    # Quit at once, the first layer's commit may or may not have been reached: no later than it.
    assert resumed_at == 2 if times == 1 else resumed_at in (None, 1, 2), resumed_at
    resumed, whole = load_file(tmp_path / "out" / "model.safetensors"), load_file(setup.gptq / "model.safetensors")
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)


# ---------------------------------------------------------------- kill -9 while an artifact is written

BUILD_SCRIPT = """
import sys, time
from pathlib import Path
from expert.artifacts import ArtifactStore, StageRequest
root, ready, count = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
pause = float(sys.argv[4])
def produce(out):
    with open(count, "a") as f:
        f.write("x")  # one mark per producer call, in any process
    (out / "part-1.txt").write_text("first half")
    ready.write_text("writing")
    time.sleep(pause)
    (out / "part-2.txt").write_text("second half")
    return {"parts": 2}
art = ArtifactStore(root).build(StageRequest("format_mmlu", 1, {"n": 1}), produce)
print(art.path)
"""


def test_kill_while_writing_an_artifact_leaves_no_manifest_and_the_next_run_recomputes(tmp_path):
    request = StageRequest("format_mmlu", 1, {"n": 1})
    store = ArtifactStore(tmp_path / "artifacts")
    ready, count = tmp_path / "ready", tmp_path / "count"
    proc = spawn(BUILD_SCRIPT, store.root, ready, count, 60)
    wait_for(ready.is_file, proc)
    kill9(proc)
    stage_dir = store.root / "format_mmlu"
    debris = [p for p in stage_dir.iterdir() if p.name.startswith(".tmp-")]
    assert debris and not list(stage_dir.rglob(MANIFEST))  # half-written, and never marked complete
    assert not store.path("format_mmlu", request.key).exists()
    assert store.get(request) is None  # what every later stage asks before reading

    path = finish(spawn(BUILD_SCRIPT, store.root, tmp_path / "ready2", count, 0)).strip()
    assert count.read_text() == "xx"  # recomputed, not taken from the partial folder
    assert Path(path) == store.path("format_mmlu", request.key) and verify(Path(path)) is None
    assert sorted(p.name for p in stage_dir.iterdir()) == [request.key]  # the debris is gone too


# ---------------------------------------------------------------- a flipped byte

def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def build_mmlu(store: ArtifactStore, tmp_path: Path, calls: list):
    from expert.benchmarks.mmlu import MMLUConfig, format_mmlu
    from tests.fixtures.data import write_mmlu_dir

    source = write_mmlu_dir(tmp_path / "mmlu")
    request = StageRequest("format_mmlu", 1, {"source": "fixture"})
    return request, lambda: store.get(request) or store.build(
        request, lambda out: calls.append(1) or format_mmlu(MMLUConfig(), source, out))


def test_flipped_byte_in_a_small_file_is_caught_before_use_and_the_stage_recomputed(tmp_path):
    store, calls = ArtifactStore(tmp_path / "artifacts"), []
    request, get_or_build = build_mmlu(store, tmp_path, calls)
    first = get_or_build()
    good = (first.path / "test.parquet").read_bytes()
    flip(first.path / "test.parquet", len(good) // 2)
    assert "content differs" in verify(first.path)
    assert store.get(request) is None
    again = get_or_build()
    assert len(calls) == 2 and (again.path / "test.parquet").read_bytes() == good


@pytest.fixture
def small_limits(monkeypatch):
    """Make 64 KiB files "big" (sampled on use), with 8 sampled blocks of 1 KiB."""
    monkeypatch.setattr(artifacts, "QUICK_DIGEST_LIMIT", 16 * 1024)
    monkeypatch.setattr(artifacts, "SAMPLE_BLOCKS", 8)
    monkeypatch.setattr(artifacts, "SAMPLE_BLOCK_BYTES", 1024)


def test_big_files_are_checked_by_size_and_sampled_digest_and_fully_by_expert_verify(tmp_path, small_limits, capsys):
    store = ArtifactStore(tmp_path / "artifacts")
    request = StageRequest("import_model", 1, {})
    payload = random.Random(0).randbytes(64 * 1024)
    art = store.build(request, lambda out: (out / "model.safetensors").write_bytes(payload) and None)
    desc = art.manifest["files"]["model.safetensors"]
    assert desc["size"] == len(payload) and "sampled_sha256" in desc and "sha256" in desc
    weights = art.path / "model.safetensors"

    flip(weights, 0)  # the first block is always sampled
    assert "sampled digest" in verify(art.path) and store.get(request) is None
    flip(weights, 0)
    assert verify(art.path) is None

    # Between two sampled blocks: the quick check on every use misses it, the full check does not.
    span = len(payload) - 1024
    offsets = [span * i // 7 for i in range(8)]
    gap = next(o + 1024 + 10 for o in offsets if o + 1024 + 10 < offsets[offsets.index(o) + 1])
    flip(weights, gap)
    assert verify(art.path) is None
    assert "content differs from the manifest digest" in verify(art.path, full=True)
    assert main(["verify", str(store.root)]) == 2
    out, err = capsys.readouterr()
    assert f"BAD  {art.path}" in out and "model.safetensors" in out and "failed verification" in err

    weights.write_bytes(payload[:-1])  # truncated
    assert "size" in verify(art.path)


def test_expert_verify_passes_a_sound_store_and_names_every_bad_folder(tmp_path, capsys):
    store = ArtifactStore(tmp_path / "artifacts")
    good = store.build(StageRequest("s", 1, {"a": 1}), lambda out: (out / "f.txt").write_text("ok") and None)
    assert main(["verify", str(store.root)]) == 0
    assert main(["verify", str(good.path), str(store.root / "s")]) == 0
    assert f"ok  {good.path}" in capsys.readouterr().out

    partial = store.path("s", "0123456789abcdef")
    partial.mkdir()  # named like an artifact, but no manifest
    assert main(["verify", str(store.root)]) == 2
    out = capsys.readouterr().out
    assert f"BAD  {partial}" in out and "no manifest.json" in out and f"ok  {good.path}" in out
    assert main(["verify", str(tmp_path / "nowhere")]) == 2
    capsys.readouterr()

    # Resumable work and crash debris are not artifacts: named with their size, not failed.
    partial.rmdir()
    work = store.root / "s" / ".work-fedcba9876543210"
    (work / "checkpoints").mkdir(parents=True)
    (work / "checkpoints" / "adapter.safetensors").write_bytes(b"\0" * 2**20)
    (store.root / "s" / ".tmp-fedcba9876543210-1234abcd").mkdir()
    for where in (store.root, store.root / "s"):
        assert main(["verify", str(where)]) == 0
        out = capsys.readouterr().out
        assert f"note  {work} (1.0 MiB): an unfinished build's resumable work" in out
        assert f".tmp-fedcba9876543210-1234abcd (0.0 MiB): what a killed build left" in out


# ---------------------------------------------------------------- a full disk

def enospc(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_disk_full_while_a_stage_writes_says_so_and_keeps_what_was_there(tmp_path, monkeypatch):
    from expert.benchmarks import schema
    from expert.benchmarks.pubmedqa import PubMedQAConfig, format_pubmedqa
    from tests.fixtures.data import write_pubmedqa_json

    store = ArtifactStore(tmp_path / "artifacts")
    source = write_pubmedqa_json(tmp_path / "ori_pqal.json", n=60)
    produce = lambda fold: lambda out: format_pubmedqa(PubMedQAConfig(fold=fold), source, out)  # noqa: E731
    good = store.build(StageRequest("format_pubmedqa", 1, {"fold": 0}), produce(0))

    real_write = schema.pq.write_table

    def full_disk(table, where, *args, **kwargs):  # the disk fills up after the first file
        if Path(where).name == "test.parquet":
            raise enospc(where)
        return real_write(table, where, *args, **kwargs)

    monkeypatch.setattr(schema.pq, "write_table", full_disk)
    request = StageRequest("format_pubmedqa", 1, {"fold": 1})
    with pytest.raises(ExpertError, match=r"disk is full.*format_pubmedqa.*" + str(store.root / "format_pubmedqa")):
        store.build(request, produce(1))
    assert store.get(request) is None and not store.path("format_pubmedqa", request.key).exists()
    assert sorted(p.name for p in (store.root / "format_pubmedqa").iterdir()) == [good.key]  # no debris
    assert verify(good.path, full=True) is None  # the earlier artifact is untouched and usable


def test_disk_full_while_writing_the_manifest_marks_nothing_complete(tmp_path, monkeypatch):
    store = ArtifactStore(tmp_path / "artifacts")
    request = StageRequest("s", 1, {})

    def no_space(path, value):
        Path(path).write_text('{"files": {')  # a torn write, then the error
        raise enospc(path)

    monkeypatch.setattr(artifacts, "write_json_durably", no_space)
    with pytest.raises(ExpertError, match="disk is full") as err:
        store.build(request, lambda out: (out / "f.txt").write_text("x") and None)
    assert isinstance(err.value.__cause__, OSError)
    assert not (store.root / "s").exists() or not list((store.root / "s").iterdir())


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_real_enospc_from_the_kernel_is_reported_as_a_full_disk(tmp_path):
    store = ArtifactStore(tmp_path / "artifacts")

    def produce(out):
        (out / "weights.bin").symlink_to("/dev/full")  # every write to it fails with ENOSPC
        with open(out / "weights.bin", "wb") as f:
            f.write(b"\0" * 1_000_000)
            f.flush()

    with pytest.raises(ExpertError, match="disk is full.*No space left on device"):
        store.build(StageRequest("s", 1, {}), produce)


# ---------------------------------------------------------------- two runs at once

def test_two_processes_building_the_same_artifact_compute_it_once(tmp_path):
    root, count = tmp_path / "artifacts", tmp_path / "count"
    first = spawn(BUILD_SCRIPT, root, tmp_path / "ready1", count, 1.5)
    wait_for((tmp_path / "ready1").is_file, first)  # the first holds the lock and is producing
    second = spawn(BUILD_SCRIPT, root, tmp_path / "ready2", count, 1.5)
    paths = {finish(first).strip(), finish(second).strip()}
    assert count.read_text() == "x"  # produced once
    assert len(paths) == 1 and verify(Path(paths.pop())) is None
    assert [p.name for p in (root / "format_mmlu").iterdir() if p.name.startswith(".")] == []  # lock file removed


def test_the_waiting_process_says_what_it_waits_for(tmp_path, caplog, monkeypatch):
    """...and which process holds the lock, again while the wait goes on: a run that seems stuck
    names the process to look at."""
    import logging

    from expert import locks
    from expert.locks import exclusive

    monkeypatch.setattr(locks, "REMIND_S", 0.5)

    store = ArtifactStore(tmp_path / "artifacts")
    request = StageRequest("s", 1, {})
    lock = store.root / "s" / f".lock-{request.key}"
    lock.parent.mkdir(parents=True)
    holder = spawn("import sys, time\nfrom expert.locks import exclusive\nfrom pathlib import Path\n"
                   "with exclusive(Path(sys.argv[1]), 'x'):\n    Path(sys.argv[2]).touch()\n    time.sleep(1.5)\n",
                   lock, tmp_path / "held")
    wait_for((tmp_path / "held").is_file, holder)
    with caplog.at_level(logging.INFO, logger="expert"):
        art = store.build(request, lambda out: (out / "f.txt").write_text("x") and None)
    finish(holder)
    waits = [r.getMessage() for r in caplog.records if "waiting for another process" in r.getMessage()]
    assert f"waiting for another process building s/{request.key}" in waits[0]
    assert all(f"pid {holder.pid} on " in said and ", x, since " in said for said in waits)
    assert len(waits) >= 2 and "min so far" in waits[-1]
    assert verify(art.path) is None
    with exclusive(lock, "again"):  # and the lock is free again
        pass
