"""Memory planning: 'auto' micro-batch and checkpointing choices, and the out-of-memory error."""

import json

import pytest
import torch

from expert.errors import ExpertError
from expert.train import TrainConfig, train
from expert.train import memory
from expert.train.data import IGNORE, step_sizes
from expert.train.lora import attach_lora
from expert.train.memory import MemoryPlan, _checkpointing, plan_memory, set_checkpointing
from expert.train.step import Runner
from tests.expert.train_fixtures import plain_load, write_toy_data, llama_dir, one_thread  # noqa: F401 (fixtures)

RUN = dict(epochs=1, micro_batch_size=2, effective_batch_size=4, learning_rate=5e-3, warmup_steps=1,
           save_every_steps=2, max_steps=2)


def lora_model(llama_dir, **overrides):
    model, _ = plain_load(llama_dir)
    torch.manual_seed(0)
    return attach_lora(model, TrainConfig(**overrides))


def fake_gpu(monkeypatch, most, limit=24 * 2**30, speeds=None):
    """Pretend the probe measured: a micro-batch fits when it is at most most[checkpointing]
    (absent: nothing fits), and speeds[(micro, checkpointing)] -> tokens/s (the timing only a
    GPU probe offers)."""
    calls = []

    def probe_fits(model, device, config, answer_tokens=3):
        calls.append(("answer_tokens", answer_tokens))

        def fits(micro, length, checkpointing, limit):
            calls.append((micro, checkpointing))
            return micro <= most.get(checkpointing, 0)
        if speeds is not None:
            fits.speed = lambda micro, length, checkpointing, limit: (
                calls.append(("timed", micro, checkpointing)) or calls.append(("timed at", length))
                or speeds[(micro, checkpointing)])
        return fits

    monkeypatch.setattr(memory, "_probe_fits", probe_fits)
    monkeypatch.setattr(memory, "_limit_bytes", lambda config, device: limit)
    return calls


# micro 'auto' on a GPU: the largest micro-batch that fits (a divisor of effective_batch_size or
# not), then checkpointing off if that micro-batch also fits without it.
GPU_CASES = {
    "largest-fitting-with-checkpointing": (
        dict(micro_batch_size="auto", effective_batch_size=50, gradient_checkpointing="auto"),
        {True: 10}, (10, True)),
    "largest-fitting-need-not-divide-the-step": (
        dict(micro_batch_size="auto", effective_batch_size=50, gradient_checkpointing="auto"),
        {True: 9, False: 3}, (9, True)),
    "checkpointing-off-when-it-fits-anyway": (
        dict(micro_batch_size="auto", effective_batch_size=12, gradient_checkpointing="auto"),
        {True: 6, False: 6}, (6, False)),
    "fixed-micro-auto-checkpointing": (
        dict(micro_batch_size=4, effective_batch_size=8, gradient_checkpointing="auto"),
        {True: 4, False: 3}, (4, True)),
    "explicit-checkpointing-is-kept": (
        dict(micro_batch_size="auto", effective_batch_size=8, gradient_checkpointing=True),
        {True: 8, False: 8}, (8, True)),
    "explicit-no-checkpointing": (
        dict(micro_batch_size="auto", effective_batch_size=8, gradient_checkpointing=False),
        {False: 2, True: 4}, (2, False)),
}


@pytest.mark.parametrize("overrides, table, expected", GPU_CASES.values(), ids=GPU_CASES)
def test_gpu_plan_picks_the_largest_fitting_micro_batch(llama_dir, monkeypatch, overrides, table, expected):
    fake_gpu(monkeypatch, table)
    model = lora_model(llama_dir, **overrides)
    plan = plan_memory(model, TrainConfig(**overrides), longest=500, device=torch.device("cuda"))
    assert (plan.micro_batch_size, plan.gradient_checkpointing) == expected
    assert plan.limit_gib == 24.0
    assert _checkpointing(model.get_base_model()) == expected[1]


@pytest.mark.parametrize("device, processes, candidates", [
    ("cuda", 1, [50, 25, 17, 13, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1]),
    ("cpu", 1, [8, 7, 6, 5, 4, 3, 2, 1]),  # capped on a CPU
    ("cuda", 2, [25, 13, 9, 7, 5, 4, 3, 2, 1]),
])
def test_auto_tries_the_largest_micro_batch_of_every_way_to_split_a_step(device, processes, candidates):
    config = TrainConfig(micro_batch_size="auto", effective_batch_size=50, processes=processes,
                         strategy="single" if processes == 1 else "ddp")
    assert memory._micro_candidates(config, torch.device(device)) == candidates
    for micro in candidates:  # the run splits each step with at most that many, the same number per process
        sizes = step_sizes(50, micro, processes)
        assert max(sizes) == micro and sum(sizes) == 50 and len(sizes) % processes == 0


def test_the_largest_fitting_micro_batch_is_found_by_bisection(llama_dir, monkeypatch):
    calls = fake_gpu(monkeypatch, {True: 9})
    config = TrainConfig(micro_batch_size="auto", effective_batch_size=50, gradient_checkpointing=True)
    plan = plan_memory(lora_model(llama_dir), config, longest=500, device=torch.device("cuda"))
    probed = [c[0] for c in calls if c[0] != "answer_tokens"]
    assert plan.micro_batch_size == 9 and {9, 10} <= set(probed) and len(probed) <= 4, probed


@pytest.mark.parametrize("speeds, expected", [({(12, True): 2000.0, (4, False): 3000.0}, (4, False)),
                                               ({(12, True): 3000.0, (4, False): 2000.0}, (12, True))])
def test_a_smaller_micro_batch_without_checkpointing_wins_when_it_is_faster(llama_dir, monkeypatch, speeds,
                                                                           expected):
    # 12 fits only with checkpointing; 4 is the largest that fits without: both are timed.
    calls = fake_gpu(monkeypatch, {True: 12, False: 4}, speeds=speeds)
    config = TrainConfig(micro_batch_size="auto", effective_batch_size=12, gradient_checkpointing="auto")
    model = lora_model(llama_dir)
    plan = plan_memory(model, config, longest=500, device=torch.device("cuda"))
    assert (plan.micro_batch_size, plan.gradient_checkpointing) == expected
    assert {c for c in calls if c[0] == "timed"} == {("timed", 12, True), ("timed", 4, False)}
    assert plan.probe_tokens_per_s == {"12 with checkpointing": speeds[(12, True)],
                                       "4 without": speeds[(4, False)]}
    assert _checkpointing(model.get_base_model()) == expected[1]
    assert MemoryPlan.from_dict(plan.as_dict()) == plan


@pytest.mark.parametrize("plain_speed, expected", [(2090.0, (12, True)), (2110.0, (4, False))])
def test_the_speeds_are_timed_at_the_typical_length_and_a_near_tie_keeps_the_bigger_micro_batch(
        llama_dir, monkeypatch, plain_speed, expected):
    # Within SPEED_MARGIN (5%) the checkpointed 12 stays: per-micro-batch costs the probe does not
    # time fall on the smaller micro-batch more often (the 8B preset on an H100, bench/README.md).
    calls = fake_gpu(monkeypatch, {True: 12, False: 4}, speeds={(12, True): 2000.0, (4, False): plain_speed})
    config = TrainConfig(micro_batch_size="auto", effective_batch_size=12, gradient_checkpointing="auto")
    plan = plan_memory(lora_model(llama_dir), config, longest=500, typical=330, device=torch.device("cuda"))
    assert (plan.micro_batch_size, plan.gradient_checkpointing) == expected
    assert [c for c in calls if c[0] == "timed at"] == [("timed at", 330)] * 2


@pytest.mark.parametrize("most, timed", [({True: 8, False: 1}, False), ({True: 3, False: 1}, True)])
def test_one_example_without_checkpointing_is_timed_only_against_a_small_micro_batch(llama_dir, monkeypatch,
                                                                                    most, timed):
    speeds = {(most[True], True): 1000.0, (1, False): 2000.0}
    calls = fake_gpu(monkeypatch, most, speeds=speeds)
    config = TrainConfig(micro_batch_size="auto", effective_batch_size=24, gradient_checkpointing="auto")
    plan = plan_memory(lora_model(llama_dir), config, longest=500, device=torch.device("cuda"))
    assert any(c[0] == "timed" for c in calls) == timed
    assert (plan.micro_batch_size, plan.gradient_checkpointing) == ((1, False) if timed else (most[True], True))
    assert (plan.probe_tokens_per_s is not None) == timed


def test_fixed_settings_are_not_probed(llama_dir, monkeypatch):
    calls = fake_gpu(monkeypatch, {})
    config = TrainConfig(micro_batch_size=2, effective_batch_size=4, gradient_checkpointing=False)
    plan = plan_memory(lora_model(llama_dir), config, longest=512, device=torch.device("cuda"))
    assert plan == MemoryPlan(micro_batch_size=2, gradient_checkpointing=False, limit_gib=24.0) and not calls


def test_nothing_fits_names_the_limit_and_the_knobs(llama_dir, monkeypatch):
    fake_gpu(monkeypatch, {}, limit=12 * 2**30)
    config = TrainConfig(micro_batch_size="auto", effective_batch_size=4)
    with pytest.raises(ExpertError) as info:
        plan_memory(lora_model(llama_dir), config, longest=512, device=torch.device("cuda"))
    message = str(info.value)
    assert "12.0 GiB" in message and "1 example(s) of 512 tokens" in message
    for knob in ("micro_batch_size", "max_length", "gradient_checkpointing"):
        assert f"train.{knob}" in message


def test_cpu_auto_turns_checkpointing_off_and_caps_the_micro_batch(llama_dir):
    config = TrainConfig(micro_batch_size="auto", effective_batch_size=24)
    model = lora_model(llama_dir, gradient_checkpointing=True)
    plan = plan_memory(model, config, longest=100, device=torch.device("cpu"))
    assert plan == MemoryPlan(micro_batch_size=8, gradient_checkpointing=False, limit_gib=None)
    assert not _checkpointing(model.get_base_model())


def test_explicit_checkpointing_is_switched_on_and_off(llama_dir):
    model = lora_model(llama_dir, gradient_checkpointing=True)
    assert _checkpointing(model.get_base_model())
    set_checkpointing(model, False)
    assert not _checkpointing(model.get_base_model())


def test_auto_micro_batch_needs_resolving():
    config = TrainConfig(micro_batch_size="auto", effective_batch_size=50)
    with pytest.raises(ValueError, match="plan_memory"):
        config.accumulation_steps


def test_cuda_out_of_memory_becomes_a_clear_error(llama_dir, tmp_path, monkeypatch):
    data = write_toy_data(tmp_path / "data")

    def step(self, batches):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Runner, "step", step)
    with pytest.raises(ExpertError) as info:
        train(TrainConfig(**RUN), llama_dir, data, tmp_path / "out", tmp_path / "work", device="cpu")
    message = str(info.value)
    assert "ran out of GPU memory" in message and "micro-batches of 2 examples" in message
    for knob in ("micro_batch_size", "max_length", "gradient_checkpointing"):
        assert f"train.{knob}" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_the_plan_is_recorded_and_a_resume_keeps_it(llama_dir, tmp_path, monkeypatch):
    data = write_toy_data(tmp_path / "data")
    config = TrainConfig(**{**RUN, "micro_batch_size": "auto", "effective_batch_size": 4})
    train(config, llama_dir, data, tmp_path / "out", tmp_path / "work", device="cpu")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["micro_batch_size"] == 4
    assert summary["memory"] == {"micro_batch_size": 4, "gradient_checkpointing": False, "limit_gib": None,
                                 "probe_tokens_per_s": None,
                                 "probe_peak_gib": None}

    # A resumed run must not plan again (its data order depends on the micro-batch).
    def no_planning(*args, **kwargs):
        raise AssertionError("planned again on resume")

    monkeypatch.setattr("expert.train.loop.plan_memory", no_planning)
    longer = TrainConfig(**{**RUN, "micro_batch_size": "auto", "effective_batch_size": 4})
    train(longer, llama_dir, data, tmp_path / "out2", tmp_path / "work", device="cpu")
    assert json.loads((tmp_path / "out2" / "summary.json").read_text())["memory"] == summary["memory"]


def test_an_auto_micro_batch_that_does_not_divide_the_step_trains_in_uneven_micro_batches(llama_dir, tmp_path,
                                                                                          caplog):
    # On the CPU 'auto' allows up to 8: a step of 9 is then 5 + 4, not 3 + 3 + 3.
    data = write_toy_data(tmp_path / "data")
    config = TrainConfig(**{**RUN, "micro_batch_size": "auto", "effective_batch_size": 9})
    with caplog.at_level("INFO", logger="expert"):
        train(config, llama_dir, data, tmp_path / "out", tmp_path / "work", device="cpu")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["micro_batch_size"], summary["step_micro_batches"], summary["steps"]) == (5, [5, 4], 2)
    assert "2 optimizer steps of 2 micro-batches of 4-5" in caplog.text


def test_the_probe_labels_as_many_tokens_as_the_longest_answer(llama_dir, monkeypatch):
    # The vocabulary projection is built for every labelled token, so a task with long answers
    # needs more memory per example than PubMedQA's 2-3: the probe must label as many.
    calls = fake_gpu(monkeypatch, {True: 4})
    config = TrainConfig(micro_batch_size="auto", effective_batch_size=4, gradient_checkpointing=True)
    plan_memory(lora_model(llama_dir), config, longest=500, device=torch.device("cuda"), answer_tokens=40)
    assert ("answer_tokens", 40) in calls

    seen = []

    def loss_fn(model, batch, device):
        seen.append(batch["labels"])
        return model(input_ids=batch["input_ids"][:, :4]).logits.float().sum()

    for name in ("empty_cache", "reset_peak_memory_stats", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 123)
    model, _ = plain_load(llama_dir)
    assert memory._probe(model, loss_fn, torch.device("cpu"), 2, 64, False, amp=None, answer_tokens=40) == 123
    assert (seen[0] != IGNORE).sum(dim=1).tolist() == [40, 40]
    assert memory._probe(model, loss_fn, torch.device("cpu"), 2, 8, False, amp=None, answer_tokens=40) == 123
    assert (seen[1] != IGNORE).sum(dim=1).tolist() == [7, 7]  # the first token stays prompt
