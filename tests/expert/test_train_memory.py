"""Memory planning: 'auto' micro-batch and checkpointing choices, and the out-of-memory error."""

import json

import pytest
import torch

from expert.errors import ExpertError
from expert.train import TrainConfig, train
from expert.train import memory, recompute
from expert.train.data import IGNORE, step_sizes
from expert.train.lora import attach_lora
from expert.train.memory import MemoryPlan, plan_memory
from expert.train.recompute import is_checkpointing, set_checkpointing
from expert.train.step import Runner
from tests.expert.train_fixtures import plain_load, write_toy_data, llama_dir, one_thread  # noqa: F401 (fixtures)

RUN = dict(epochs=1, micro_batch_size=2, effective_batch_size=4, learning_rate=5e-3, warmup_steps=1,
           save_every_steps=2, max_steps=2)


def lora_model(llama_dir, **overrides):
    model, _ = plain_load(llama_dir)
    torch.manual_seed(0)
    return attach_lora(model, TrainConfig(**overrides))


def fake_gpu(monkeypatch, most, limit=24 * 2**30, speeds=None, guess=None):
    """Pretend the probe measured: a micro-batch fits when it is at most most[recomputed], the
    layers recomputed: True stands for all of them, False for none, a count for itself and every
    count above it up to the next one given (absent: what no checkpointing fits; nothing given:
    nothing fits). speeds[(micro, recomputed)] -> tokens/s (the timing only a GPU probe offers);
    guess(micro, length, every, limit): the probe's guess of the fewest layers to recompute."""
    calls = []

    def probe_fits(model, device, config, every, answer_tokens=3):
        calls.append(("answer_tokens", answer_tokens))

        def largest(recomputed):
            if recomputed == every:
                return most.get(True, 0)
            given = [k for k in most if not isinstance(k, bool) and k <= recomputed]
            return most[max(given)] if given else most.get(False, 0)

        def key(micro, recomputed):
            return (micro, {0: False, every: True}.get(recomputed, recomputed))

        def fits(micro, length, recomputed, limit):
            calls.append(key(micro, recomputed))
            return micro <= largest(recomputed)
        if speeds is not None:
            fits.speed = lambda micro, length, recomputed, limit: (
                calls.append(("timed", *key(micro, recomputed))) or calls.append(("timed at", length))
                or speeds[key(micro, recomputed)])
        if guess is not None:
            fits.guess = guess
        return fits

    monkeypatch.setattr(memory, "_probe_fits", probe_fits)
    monkeypatch.setattr(memory, "_limit_bytes", lambda config, device: limit)
    monkeypatch.setattr(memory.torch.cuda, "reset_peak_memory_stats", lambda device: calls.append(("peak reset", device)))
    return calls


def layered_model(layers: int = 8):
    """A LoRA-wrapped random Llama of `layers` tiny decoder layers (built, not saved)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=layers, vocab_size=96)
    torch.manual_seed(0)
    return attach_lora(LlamaForCausalLM(config), TrainConfig())


def recomputing(model) -> list[bool]:
    return [layer.gradient_checkpointing for layer in recompute.decoder_layers(model)]


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
    assert is_checkpointing(model.get_base_model()) == expected[1]


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
    probed = [c[0] for c in calls if c[0] not in ("answer_tokens", "peak reset")]
    assert plan.micro_batch_size == 9 and {9, 10} <= set(probed) and len(probed) <= 4, probed
    # Last, after the probes: the run's logged peak memory is its own, not the largest probe's.
    assert calls[-1] == ("peak reset", torch.device("cuda"))


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
    assert is_checkpointing(model.get_base_model()) == expected[1]
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


@pytest.mark.parametrize("every", [1, 2, 7, 8, 60])
def test_fewest_finds_the_least_layers_to_recompute_by_bisection(every):
    for needed in range(every + 1):
        asked = []
        found = recompute.fewest(every, lambda r: asked.append(r) or r >= needed)
        assert found == needed
        # none first, then one fewer than all: a micro-batch that needs every layer costs two probes
        assert asked[:2] == [0, every - 1][:len(asked[:2])] and len(asked) <= 2 + max(1, every - 1).bit_length()


@pytest.mark.parametrize("off", [None, 0, 1, -1, 2, -2, 7, -30, 100])
def test_a_guess_of_the_fewest_layers_costs_two_probes_when_right_and_is_never_wrong(off):
    every = 60
    for needed in range(1, every):
        asked = []
        guess = None if off is None else (lambda: needed + off)
        assert recompute.fewest(every, lambda r: asked.append(r) or r >= needed, guess) == needed, off
        probes = len(asked) - (2 if off is None else 3)  # after none, all but one (and all but two)
        if off is not None and -1 <= off <= 1 and 2 < needed < every - 3:
            assert probes == {0: 2, -1: 2, 1: 3}[off], asked  # the guess and a neighbour or two
        assert probes <= 3 + (every - 2).bit_length(), asked  # a wrong guess: three, then a bisection


def test_the_probe_guesses_from_the_peaks_with_one_and_two_layers_fewer(monkeypatch):
    # Peaks of 10 GiB with all 8 layers recomputed or 7 (the last layer keeps what its backward
    # would recompute first anyway) and 11 GiB with 6: each further layer left out adds 1 GiB.
    # Under 90% of the limit, minus the optimizer's moments, that leaves room for 4 more.
    model = layered_model(8)
    fits = memory._probe_fits(model, torch.device("cuda"), TrainConfig(), every=8)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    moments = 8 * trainable
    gib = 2**30
    fits.peaks.update({(4, 100, 8): 10 * gib, (4, 100, 7): 10 * gib, (4, 100, 6): 11 * gib})
    limit = (15.5 * gib + moments) / memory.HEADROOM  # room for 4.5 layers above the 6's peak
    assert fits.guess(4, 100, 8, limit) == 2
    fits.peaks.update({(5, 100, 8): 10 * gib, (5, 100, 7): 10.1 * gib})
    assert fits.guess(5, 100, 8, limit) is None  # all and one fewer alone say nothing of the step
    fits.peaks[(5, 100, 6)] = None  # two fewer did not fit
    assert fits.guess(5, 100, 8, limit) is None


def test_on_peaks_shaped_as_measured_the_guess_lands_on_the_fewest(monkeypatch):
    """Peaks as a model's grow (on the CPU, a 6-layer Llama at 8 x 1024 tokens peaked at 249.5,
    248.9, 369.7 and 490.3 MiB with 6, 5, 4 and 3 layers recomputed): one layer fewer than all
    adds nothing, each further one about the same. Whatever the limit, the planner then asks about
    none, one and two fewer than all, the guess and one neighbour, where a bisection of 60 layers
    asks eight times."""
    import contextlib

    every, gib = 60, 2**30

    def peak(recomputed: int) -> float | None:  # no checkpointing does not fit
        return None if recomputed == 0 else (10 + 0.25 * max(1, every - recomputed)) * gib

    monkeypatch.setattr(memory, "_probe", lambda model, loss_fn, device, micro, length, layers, **kw: peak(layers[0]))
    monkeypatch.setattr(memory, "_capped", lambda device, limit: contextlib.nullcontext())
    model = layered_model(2)  # _probe_fits counts its trainable parameters only
    moments = 8 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    for needed in range(1, every - 1):
        fits = memory._probe_fits(model, torch.device("cuda"), TrainConfig(), every=every)
        limit = (peak(needed) + moments + 0.1 * gib) / memory.HEADROOM  # fits `needed`, not one fewer
        asked = []
        found = recompute.fewest(every, lambda r: asked.append(r) or fits(4, 100, r, limit),
                                 lambda: fits.guess(4, 100, every, limit))
        assert found == needed, asked
        assert asked[:3] == [0, every - 1, every - 2][:len(asked[:3])] and len(asked) <= 5, asked


def test_auto_recomputes_only_the_layers_the_micro_batch_needs(monkeypatch):
    # 10 fits when at least 5 of 8 layers recompute; without checkpointing only 3 fit, and no
    # probe can time them (a CPU-like fits): the 10 keeps the other 3 layers' activations.
    calls = fake_gpu(monkeypatch, {True: 10, 5: 10, False: 3})
    model = layered_model(8)
    config = TrainConfig(micro_batch_size="auto", effective_batch_size=50, gradient_checkpointing="auto")
    plan = plan_memory(model, config, longest=500, device=torch.device("cuda"))
    assert (plan.micro_batch_size, plan.gradient_checkpointing, plan.recomputed_layers) == (10, True, 5)
    assert recomputing(model) == [True] * 5 + [False] * 3  # the first ones
    assert plan.checkpointing_text == "on for the first 5 layers"
    assert len({c for c in calls if c[0] == 10}) <= 6  # all, none, 7, then bisection over 1-7 (3)
    assert MemoryPlan.from_dict(plan.as_dict()) == plan


@pytest.mark.parametrize("speeds, expected", [
    ((3000.0, 3100.0, 3100.0), (10, 5)),  # within the margin: the biggest micro-batch stays
    ((3000.0, 3400.0, 3500.0), (5, 2)),   # 5 beats 10; 3 is not 5% faster than 5
    ((3000.0, 3100.0, 3200.0), (3, 0)),   # 3 beats 10 by more than 5%
])
def test_a_smaller_micro_batch_recomputing_fewer_layers_is_timed(monkeypatch, speeds, expected):
    # 10 needs 5 of 8 layers recomputed, 3 fits without; the middle candidate 5 (sqrt(30) = 5.5)
    # needs only 2. All three are timed, largest first.
    timings = dict(zip([(10, 5), (5, 2), (3, False)], speeds))
    calls = fake_gpu(monkeypatch, {True: 10, 5: 10, 2: 6, False: 3}, speeds=timings)
    model = layered_model(8)
    config = TrainConfig(micro_batch_size="auto", effective_batch_size=50, gradient_checkpointing="auto")
    plan = plan_memory(model, config, longest=500, typical=300, device=torch.device("cuda"))
    assert (plan.micro_batch_size, plan.recomputed_layers or 0) == expected
    assert plan.gradient_checkpointing == (expected[1] > 0)
    assert [c for c in calls if c[0] == "timed"] == [("timed", 10, 5), ("timed", 5, 2), ("timed", 3, False)]
    assert {c for c in calls if c[0] == "timed at"} == {("timed at", 300)}
    assert plan.probe_tokens_per_s == {"10 recomputing 5 of 8": speeds[0], "5 recomputing 2 of 8": speeds[1],
                                       "3 without": speeds[2]}
    assert recomputing(model) == [i < expected[1] for i in range(8)]


@pytest.mark.parametrize("world", [1, 2])
def test_only_a_single_process_starts_from_the_probes_guess(monkeypatch, world):
    # Each rank's guess comes from its own card: ranks must bisect alike, so several do without.
    from expert.train.distributed import Ranks

    class Agreeing(Ranks):  # what every rank answered alike, without a process group
        def agree(self, ok):
            return ok

    guesses = []
    fake_gpu(monkeypatch, {True: 10, 5: 10, False: 3}, guess=lambda *a: guesses.append(a) or 5)
    config = TrainConfig(micro_batch_size="auto", effective_batch_size=50, gradient_checkpointing="auto")
    plan = plan_memory(layered_model(8), config, longest=500, device=torch.device("cuda"),
                       ranks=Agreeing(world=world, strategy="single" if world == 1 else "ddp"))
    assert (plan.micro_batch_size, plan.recomputed_layers) == (10, 5)
    assert guesses == ([(10, 500, 8, 24 * 2**30)] if world == 1 else [])


def test_a_middle_micro_batch_that_needs_as_many_layers_is_not_timed(monkeypatch):
    calls = fake_gpu(monkeypatch, {True: 10, 5: 10, False: 3}, speeds={(10, 5): 1.0, (3, False): 1.0})
    config = TrainConfig(micro_batch_size="auto", effective_batch_size=50, gradient_checkpointing="auto")
    plan_memory(layered_model(8), config, longest=500, device=torch.device("cuda"))
    assert [c for c in calls if c[0] == "timed"] == [("timed", 10, 5), ("timed", 3, False)]


def test_the_cpu_estimate_recomputes_only_the_layers_it_must(monkeypatch):
    # Available RAM set so that 8 examples fit with 4 of 8 layers' activations kept (plus the one
    # being recomputed), not with 5: the estimate's own arithmetic, on the real model's layers.
    model = layered_model(8)
    cfg = model.config
    per_token_layer = (8 * cfg.hidden_size + 4 * cfg.intermediate_size) * 4
    pages = 8 * 100 * per_token_layer * 5 * 2 // 4096 + 1
    monkeypatch.setattr(memory.os, "sysconf", lambda name: {"SC_AVPHYS_PAGES": pages, "SC_PAGE_SIZE": 4096}[name])
    config = TrainConfig(micro_batch_size="auto", effective_batch_size=8)
    plan = plan_memory(model, config, longest=100, device=torch.device("cpu"))
    assert (plan.micro_batch_size, plan.recomputed_layers) == (8, 4)
    assert recomputing(model) == [True] * 4 + [False] * 4


def test_partial_recompute_gives_the_same_loss_and_gradients_and_recomputes_only_those_layers():
    from tests.expert.test_train_lean import tiny_lora

    batch = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    runs, forwards = {}, {}
    for recomputed in (0, 2, 4):  # none, the first two of four, all
        model = tiny_lora(0.1, layers=4)
        recompute.recompute(model, recomputed, 4)
        counts = [0] * 4
        for index, layer in enumerate(recompute.decoder_layers(model)):
            # a pre-hook: the recompute stops once it has what the backward needs, before the MLP returns
            layer.mlp.register_forward_pre_hook(lambda *a, i=index: counts.__setitem__(i, counts[i] + 1))
        torch.manual_seed(5)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        runs[recomputed] = loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        forwards[recomputed] = counts
    assert forwards == {0: [1, 1, 1, 1], 2: [2, 2, 1, 1], 4: [2, 2, 2, 2]}
    for recomputed in (2, 4):  # dropout's masks are replayed: the same network, the same numbers
        assert torch.equal(runs[recomputed][0], runs[0][0])
        for name, grad in runs[0][1].items():
            assert torch.equal(runs[recomputed][1][name], grad), name


def test_a_resumed_run_recomputes_the_layers_its_plan_says():
    from expert.train import loop
    from expert.train.distributed import Ranks

    model = layered_model(8)
    saved = MemoryPlan(6, True, 24.0, recomputed_layers=3)
    config = TrainConfig(micro_batch_size="auto", effective_batch_size=12)
    assert loop._memory_plan({"memory": saved.as_dict()}, config, model, [100], 3, Ranks()) == saved
    assert recomputing(model) == [True] * 3 + [False] * 5
    old = {k: v for k, v in saved.as_dict().items() if k != "recomputed_layers"}  # recorded before the choice
    assert loop._memory_plan({"memory": old}, config, model, [100], 3, Ranks()).recomputed_layers is None
    assert recomputing(model) == [True] * 8


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
    assert not is_checkpointing(model.get_base_model())


def test_explicit_checkpointing_is_switched_on_and_off(llama_dir):
    model = lora_model(llama_dir, gradient_checkpointing=True)
    assert is_checkpointing(model.get_base_model())
    set_checkpointing(model, False)
    assert not is_checkpointing(model.get_base_model())


def test_no_switch_leaves_the_embeddings_asking_for_a_gradient(llama_dir):
    """Non-reentrant checkpointing needs no gradient at the embeddings' output: transformers' enable
    and PEFT's wrapping of a checkpointing model hook one in, each enable one more, and the
    planner switches many times. None may stay, on or off, else each backward runs through the
    first layer's frozen weights for nothing."""
    model = lora_model(llama_dir, gradient_checkpointing=True)  # PEFT's wrap hooks one in
    ids = torch.tensor([[1, 2, 3]])

    def asks_for_a_gradient() -> bool:
        return model.get_input_embeddings()(ids).requires_grad

    for layers in (None, 1, 2, None):
        set_checkpointing(model, True, layers)
        assert is_checkpointing(model.get_base_model()) and not asks_for_a_gradient(), layers
    set_checkpointing(model, False)
    assert not is_checkpointing(model.get_base_model()) and not asks_for_a_gradient()
    assert not model.get_input_embeddings()._forward_hooks


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
                                 "probe_tokens_per_s": None, "probe_peak_gib": None,
                                 "recomputed_layers": None}

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
    assert memory._probe(model, loss_fn, torch.device("cpu"), 2, 64, (0, 2), amp=None, answer_tokens=40) == 123
    assert (seen[0] != IGNORE).sum(dim=1).tolist() == [40, 40]
    assert memory._probe(model, loss_fn, torch.device("cpu"), 2, 8, (0, 2), amp=None, answer_tokens=40) == 123
    assert (seen[1] != IGNORE).sum(dim=1).tolist() == [7, 7]  # the first token stays prompt
