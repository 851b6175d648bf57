"""Training on several processes (torchrun, gloo on the CPU) against one process.

With lora_dropout 0 a step's gradient does not depend on how its micro-batches are shared out:
each rank divides its summed answer-token loss by the whole step's answer-token count and the
ranks' gradients are summed, so 2 processes must give the 1-process losses and adapter up to
float addition order (TOLERANCE; on this CPU they come out identical). Dropout is off because
each rank draws its own masks for its own micro-batches, a different random stream from one
process drawing them all in turn.

Each 2-process run starts torchrun and two Python processes (~10-20 s on 2 cores), so the runs
are module fixtures shared by the tests.
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file

from expert.errors import ConfigError, ExpertError
from expert.pipeline_config import load_preset
from expert.train import TrainConfig, list_checkpoints, train
from expert.train.launch import _root_cause
from expert.train.worker import KILL_ENV
from tests.expert.test_train_compile import needs_compiler
from tests.expert.train_fixtures import llama_dir, one_thread, write_toy_data  # noqa: F401 (fixtures)

# 24 examples, micro-batch 2, 2 per step: 9 steps over 1.5 epochs; with 2 processes each rank
# takes one micro-batch of each step.
RUN = dict(epochs=1.5, micro_batch_size=2, effective_batch_size=4, learning_rate=5e-3, warmup_steps=2,
           save_every_steps=2, lora_dropout=0.0)
DDP = dict(RUN, processes=2, strategy="ddp")
TOLERANCE = 1e-6  # relative, on losses and adapter weights: float32 summed in another order


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_toy_data(tmp_path_factory.mktemp("data"))


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def run(config: dict, llama_dir, data_dir, root) -> tuple:
    """Train `config` into root/out (work in root/work); its progress calls and `expert` log lines."""
    calls, lines, logger = [], Lines(), logging.getLogger("expert")
    level = logger.level
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)  # as Prefect's run logger sets it
    try:
        train(TrainConfig(**config), llama_dir, data_dir, root / "out", root / "work", device="cpu",
              progress=lambda done, total: calls.append((done, total)))
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)
    return root / "out", calls, lines.messages


@pytest.fixture(scope="module")
def single(llama_dir, data_dir, tmp_path_factory):
    return run(RUN, llama_dir, data_dir, tmp_path_factory.mktemp("single"))[0]


@pytest.fixture(scope="module")
def ddp(llama_dir, data_dir, tmp_path_factory):
    return run(DDP, llama_dir, data_dir, tmp_path_factory.mktemp("ddp"))


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def adapter(out, name="final"):
    return load_file(out / name / "adapter_model.safetensors")


def assert_close_adapters(a: dict, b: dict, rel: float = TOLERANCE) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=rel, atol=rel, msg=key)


def assert_same_losses(ours: list[dict], theirs: list[dict], rel: float = TOLERANCE) -> None:
    assert [(r["step"], "loss" in r) for r in ours] == [(r["step"], "loss" in r) for r in theirs]
    for a, b in zip(ours, theirs):
        key = "loss" if "loss" in a else "dev_loss"
        assert a[key] == pytest.approx(b[key], rel=rel), (a, b)


# ---------------------------------------------------------------- data parallel

def test_two_processes_give_the_one_process_losses_and_adapter(single, ddp):
    out, calls, lines = ddp
    assert_same_losses(records(out), records(single))  # every step's loss and every dev loss
    assert_close_adapters(adapter(out), adapter(single))
    assert [s for s, _ in list_checkpoints(out)] == [s for s, _ in list_checkpoints(single)] == [2, 4, 6, 8, 9]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 9 and summary["resumed_from"] == []
    assert calls == [(step, 9) for step in range(1, 10)]  # rank 0's progress reached the caller
    assert any(line.startswith("[rank 0]") and "step 9/9" in line for line in lines), lines[-20:]
    assert (out / "loss.png").is_file() and list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_a_rank_killed_mid_run_is_named_and_the_rerun_resumes_to_the_same_adapter(ddp, llama_dir, data_dir,
                                                                                    tmp_path, monkeypatch):
    monkeypatch.setenv(KILL_ENV, "1:5")  # rank 1 SIGKILLs itself after step 5; checkpoints at 2 and 4
    with pytest.raises(ExpertError, match=r"rank 1 of 2: Signal 9 \(SIGKILL\)") as failed:
        run(DDP, llama_dir, data_dir, tmp_path)
    assert "run the stage again to resume" in str(failed.value)
    assert [s for s, _ in list_checkpoints(tmp_path / "work")] == [2, 4]
    assert not (tmp_path / "out").exists()
    monkeypatch.delenv(KILL_ENV)
    out, calls, _ = run(DDP, llama_dir, data_dir, tmp_path)  # the same call again
    assert calls[0] == (4, 9) and json.loads((out / "summary.json").read_text())["resumed_from"] == [4]
    reference = ddp[0]
    for name in ("final", "checkpoints/step-000006"):  # tolerance 0: the same 2-process arithmetic
        ours, theirs = adapter(out, name), adapter(reference, name)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert [{k: v for k, v in r.items() if k not in ("tokens_per_s", "seconds", "memory_mb")} for r in records(out)] == \
        [{k: v for k, v in r.items() if k not in ("tokens_per_s", "seconds", "memory_mb")} for r in records(reference)]


def test_ranks_skip_a_damaged_last_checkpoint_together_and_take_a_new_log_every_steps(ddp, llama_dir, data_dir,
                                                                                      tmp_path, monkeypatch):
    monkeypatch.setenv(KILL_ENV, "1:5")  # checkpoints at 2 and 4
    with pytest.raises(ExpertError):
        run(DDP, llama_dir, data_dir, tmp_path)
    monkeypatch.delenv(KILL_ENV)
    checkpoints = tmp_path / "work" / "checkpoints"
    (checkpoints / "step-000004" / "optimizer.safetensors").write_bytes(b"")  # as a power loss can leave it
    # A new log_every_steps: not in the key, so the same work resumes, and every rank gets the value.
    out, calls, lines = run({**DDP, "log_every_steps": 3}, llama_dir, data_dir, tmp_path)
    assert calls[0] == (2, 9) and json.loads((out / "summary.json").read_text())["resumed_from"] == [2]
    assert any("step-000004 is damaged" in line for line in lines), lines[-20:]
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.startswith(".")) == [".bad-step-000004"]
    ours, theirs = adapter(out), adapter(ddp[0])
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert [r["step"] for r in records(out) if "loss" in r] == [1, 2, 3, 6, 9]


def test_auto_splits_each_step_into_uneven_micro_batches_shared_evenly_and_gives_the_one_process_run(
        llama_dir, data_dir, tmp_path, monkeypatch):
    # A step of 18 with 'auto' on 2 processes (at most 8 each on a CPU): 4 micro-batches of 5, 5, 4, 4,
    # two per rank. One process given the same micro-batch (5) splits its steps alike, so with
    # dropout off both must train the same adapter.
    config = dict(RUN, micro_batch_size="auto", effective_batch_size=18)
    out, _, lines = run(dict(config, processes=2, strategy="ddp"), llama_dir, data_dir, tmp_path / "ddp")
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["micro_batch_size"], summary["step_micro_batches"]) == (5, [5, 5, 4, 4])
    assert any("3 optimizer steps of 4 micro-batches of 4-5" in line for line in lines), lines[:20]

    from expert.train import loop
    from expert.train.memory import MemoryPlan

    monkeypatch.setattr(loop, "plan_memory", lambda *a, **k: MemoryPlan(5, False, None))
    alone = run(config, llama_dir, data_dir, tmp_path / "single")[0]
    assert json.loads((alone / "summary.json").read_text())["step_micro_batches"] == [5, 5, 4, 4]
    assert_same_losses(records(out), records(alone))
    assert_close_adapters(adapter(out), adapter(alone))


@needs_compiler
def test_compiled_layers_train_under_ddp_as_one_eager_process(llama_dir, data_dir, tmp_path):
    # train.compile in torchrun's workers: each rank compiles its own layers; the gradients are
    # summed outside them. In float32 the compiled 2-process run gives the eager 1-process one to
    # float rounding (under bf16 autocast fused kernels round differently: test_train_compile).
    config = dict(RUN, precision="float32", epochs=1, save_every_steps=3)
    out, _, lines = run(dict(config, processes=2, strategy="ddp", compile=True), llama_dir, data_dir,
                        tmp_path / "ddp")
    assert any(line.startswith("[rank 1]") and "decoder layers compiled" in line for line in lines), lines[:20]
    alone = run(config, llama_dir, data_dir, tmp_path / "single")[0]
    assert_same_losses(records(out), records(alone), rel=1e-5)
    assert_close_adapters(adapter(out), adapter(alone), rel=1e-4)


# ---------------------------------------------------------------- fsdp

@pytest.mark.parametrize("base", ["plain", pytest.param("nf4", marks=pytest.mark.slow)])
def test_fsdp_gives_the_one_process_losses_and_adapter(base, llama_dir, data_dir, tmp_path):
    if base == "nf4":
        pytest.importorskip("bitsandbytes")
        from expert.quantize import QuantizeConfig
        from expert.quantize.nf4 import write_record

        model = tmp_path / "nf4"
        write_record(QuantizeConfig(method="nf4"), llama_dir, model)  # quantized at load, on each rank
    else:
        model = llama_dir
    short = dict(RUN, max_steps=4)
    one = run(short, model, data_dir, tmp_path / "one")[0]
    two, _, lines = run(dict(short, processes=2, strategy="fsdp"), model, data_dir, tmp_path / "two")
    assert_same_losses(records(two), records(one))
    assert_close_adapters(adapter(two), adapter(one))
    sharded = [line for line in lines if "fsdp: the base's weights are sharded across 2 processes" in line]
    assert sharded, lines[-20:]  # really sharded: rank 0 holds half of the base's values
    held, whole = map(int, sharded[0].split("holds ")[1].split(" values")[0].split(" of "))
    assert 2 * held == whole


def test_fsdp_refuses_a_gptq_base_before_starting_any_process(llama_dir, data_dir, tmp_path):
    gptq = tmp_path / "gptq"
    shutil.copytree(llama_dir, gptq)
    config = json.loads((gptq / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 64}
    (gptq / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="'train.strategy' is fsdp and the base .* is GPTQ-quantized: FSDP "
                                          "cannot shard a GPTQ base .* train.strategy: ddp .* quantize.method: nf4"):
        train(TrainConfig(**RUN, processes=2, strategy="fsdp"), gptq, data_dir, tmp_path / "out", tmp_path / "work",
              device="cpu")
    assert not (tmp_path / "work" / "torchrun").exists()


def test_the_pipeline_config_refuses_fsdp_on_gptq_at_load_time():
    fsdp = ["train.strategy=fsdp", "train.processes=2", "train.effective_batch_size=8"]
    with pytest.raises(ConfigError, match="'train.strategy' is fsdp and 'quantize.method' is gptq: .*nf4"):
        load_preset("default", [*fsdp, "quantize.method=gptq"])
    assert load_preset("default", [*fsdp, "quantize.method=nf4"]).train.strategy == "fsdp"


class Sent(Exception):
    """Stops `same_weights` right after its broadcast: a meta tensor holds no values to copy back."""


def test_lora_weights_are_broadcast_on_the_collective_device(monkeypatch):
    # init_process_group("nccl") serves CUDA tensors only, and under fsdp the LoRA weights of a plain
    # base are still on the CPU when they are broadcast. This CPU has no CUDA: the collective device is
    # played by "meta", NCCL by a broadcast that refuses other devices with NCCL's own error.
    import torch.distributed as dist

    from expert.train import distributed

    sent = []

    def nccl_broadcast(tensor, src):
        if tensor.device.type != "meta":
            raise RuntimeError(f"No backend type associated with device type {tensor.device.type}")
        sent.append((tuple(tensor.shape), src))
        raise Sent

    monkeypatch.setattr(distributed, "_collective_device", lambda: torch.device("meta"))
    monkeypatch.setattr(dist, "broadcast", nccl_broadcast)
    ranks = distributed.Ranks(rank=1, world=2, strategy="fsdp")
    for shape in ((4, 2), (2, 4)):
        with pytest.raises(Sent):
            ranks.same_weights([torch.nn.Parameter(torch.zeros(shape))])  # on the CPU, as attach_lora left it
    assert sent == [((4, 2), 0), ((2, 4), 0)]


def test_lora_weights_broadcast_by_rank_0_land_in_the_parameters(monkeypatch):
    import torch.distributed as dist

    from expert.train import distributed

    monkeypatch.setattr(distributed, "_collective_device", lambda: torch.device("cpu"))  # gloo's
    monkeypatch.setattr(dist, "broadcast", lambda tensor, src: tensor.fill_(7.0))  # rank 0's values arrive
    weights = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.ones(2, 2))]
    distributed.Ranks(rank=1, world=2, strategy="fsdp").same_weights(weights)
    assert all(torch.equal(p.data, torch.full_like(p.data, 7.0)) for p in weights)


# ---------------------------------------------------------------- config

@pytest.mark.parametrize("values, field, hint", [
    ({"processes": 2}, "train.strategy", "'single' runs one process but processes is 2; use strategy ddp"),
    ({"strategy": "ddp"}, "train.strategy", "ddp needs processes of 2 or more"),
    ({"strategy": "zero3"}, "train.strategy", "'single', 'ddp' or 'fsdp'"),
    ({"processes": 0}, "train.processes", "greater than or equal to 1"),
    ({"processes": 2, "strategy": "ddp", "micro_batch_size": 2, "effective_batch_size": 50},
     "train.effective_batch_size", "multiple of micro_batch_size x processes (2 x 2 = 4), e.g. 48 or 52"),
    ({"processes": 3, "strategy": "ddp", "micro_batch_size": "auto", "effective_batch_size": 50},
     "train.effective_batch_size", "multiple of processes (3), e.g. 48 or 51"),
    ({"processes": 2, "strategy": "fsdp", "micro_batch_size": "auto", "effective_batch_size": 8},
     "train.strategy", "fsdp needs a numeric micro_batch_size"),
])
def test_scale_out_settings_are_checked_with_the_field_and_the_fix(values, field, hint):
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict(values, where="train")
    assert f"'{field}'" in str(info.value) and hint in str(info.value), str(info.value)


def test_one_process_configs_keep_their_cache_key():
    # Keys and checkpoints of runs made before the scale-out fields existed stay valid.
    assert "processes" not in TrainConfig().canonical() and "strategy" not in TrainConfig().canonical()
    canon = TrainConfig(processes=2, strategy="ddp", effective_batch_size=48).canonical()
    assert (canon["processes"], canon["strategy"]) == (2, "ddp")


# ---------------------------------------------------------------- reading torchrun's failure report

SIGKILLED = """Root Cause (first observed failure):
[0]:
  time      : 2026-11-26_18:06:56
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 22110)  (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 22110
======================================================="""
RAISED = """Root Cause (first observed failure):
[0]:
  time      : 2026-11-26_18:06:52
  host      : localhost
  rank      : 3 (local_rank: 1)
  exitcode  : 1 (pid: 22063)
  error_file: /tmp/logs/none_yebt08jr/attempt_0/1/error.json
  traceback : Traceback (most recent call last):
    File "/x/expert/train/loop.py", line 9, in main
      raise ConfigError("train.target_modules: q_prj not found")
  expert.errors.ConfigError: train.target_modules: q_prj not found

============================================================"""


# Under load torchrun may observe the peer that lost its connection first: the killed rank is
# then only listed under "Failures" (a CI run's report, shortened).
KNOCK_ON = """Failures:
[1]:
  time      : 2026-11-26_18:51:01
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : {code} (pid: 20503){note}
  error_file: <N/A>
  traceback : {error}
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-26_18:51:01
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : {root_code} (pid: 20502)
  error_file: /tmp/torchrun/none_lmahby2b/attempt_0/0/error.json
  traceback : Traceback (most recent call last):
    File "/x/expert/train/distributed.py", line 93, in sum_
      dist.all_reduce(tensor)
  RuntimeError: [../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:16281: Connection reset by peer.
============================================================"""


@pytest.mark.parametrize("report, rank, error", [
    (SIGKILLED, 1, "Signal 9 (SIGKILL) received by PID 22110"),
    (KNOCK_ON.format(code=-9, note="  (SIGKILL)", error="Signal 9 (SIGKILL) received by PID 20503", root_code=-15),
     1, "Signal 9 (SIGKILL) received by PID 20503"),
    (KNOCK_ON.format(code=1, note="", error="expert.errors.DataError: bad row", root_code=1),
     1, "expert.errors.DataError: bad row"),
    (RAISED, 3, "expert.errors.ConfigError: train.target_modules: q_prj not found"),
    ("torchrun: error: the following arguments are required", None, ""),
])
def test_the_failed_rank_and_its_error_are_read_from_torchruns_report(report, rank, error):
    lines = ["Failures:", "[1]:", "  rank      : 0 (local_rank: 0)", *report.splitlines()]
    assert _root_cause(lines) == (rank, error)


def test_rank_lines_are_relayed_at_their_level_without_the_workers_prefix(caplog):
    from expert.train.launch import _Stream

    stream = _Stream(None)
    with caplog.at_level(logging.INFO, logger="expert.train"):
        for line in ("[default0]:INFO expert.train: step 1/8 loss 10.5", "[default1]:WARNING expert.train.data: cut",
                     "[default0]:a library's own line", "[default0]:   ", "Setting OMP_NUM_THREADS to 1"):
            stream.line(line)
    relayed = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert relayed == [("INFO", "[rank 0] step 1/8 loss 10.5"), ("WARNING", "[rank 1] cut"),
                       ("INFO", "[rank 0] a library's own line"), ("INFO", "torchrun: Setting OMP_NUM_THREADS to 1")]
