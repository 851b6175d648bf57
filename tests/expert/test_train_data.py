"""Training examples: evaluator tokenization, prompt masking, left truncation, bucketed batches."""

import pyarrow as pa
import pyarrow.parquet as pq
import numpy as np
import pytest
from transformers import AutoTokenizer

from expert.errors import DataError
from expert.train.data import (IGNORE, BatchPlan, bucket_size, collate, encode_split, epoch_batches, read_split, step_sizes,
                               unbucketed_padding_fraction)
from tests.expert.train_fixtures import toy_rows, write_toy_data
from tests.fixtures.models import tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(tiny_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return read_split(write_toy_data(tmp_path_factory.mktemp("data")) / "train.parquet")


def test_prompt_is_masked_and_answer_plus_eos_labelled(tokenizer, rows):
    split = encode_split(tokenizer, rows, max_length=512)
    assert split.truncated == 0 and len(split.examples) == len(rows["prompt"])
    for prompt, answer, example in zip(rows["prompt"], rows["answer"], split.examples):
        # lm-eval's split: encode the whole text, cut at the encoded prompt's length.
        n_prompt = len(tokenizer(prompt)["input_ids"])
        whole = tokenizer(prompt + " " + answer)["input_ids"]
        assert example.input_ids == whole + [tokenizer.eos_token_id]
        assert example.labels == [IGNORE] * n_prompt + whole[n_prompt:] + [tokenizer.eos_token_id]
        assert tokenizer.decode(whole[n_prompt:]) == " " + answer
        assert example.answer_tokens == len(whole) - n_prompt + 1  # what the loss divides by: answer + EOS


def test_answer_tokens_are_the_evaluators(tokenizer, rows):
    from expert.evaluation.scoring import encode_questions

    split = encode_split(tokenizer, rows, max_length=512)
    questions = encode_questions(tokenizer, rows["prompt"], [[" " + a] for a in rows["answer"]])
    for example, question in zip(split.examples, questions):
        labelled = [t for t in example.labels if t != IGNORE]
        assert labelled == question.choices[0] + [tokenizer.eos_token_id]


def test_long_prompts_lose_tokens_on_the_left_and_are_counted(tokenizer, rows):
    full = encode_split(tokenizer, rows, max_length=512).examples
    limit = sorted(len(e.input_ids) for e in full)[len(full) // 2]  # about half must be cut
    cut = encode_split(tokenizer, rows, max_length=limit)
    expected = [e for e in full if len(e.input_ids) > limit]
    assert cut.truncated == len(expected) > 0
    long_ids = [pid for pid, e in zip(rows["id"], full) if len(e.input_ids) > limit]
    assert cut.truncated_ids == long_ids[:len(cut.truncated_ids)] and cut.truncated_ids  # the first few, named
    for before, after in zip(full, cut.examples):
        assert after.input_ids == before.input_ids[-limit:]  # the answer and the prompt's end survive
        assert after.labels == before.labels[-limit:]


def test_answer_that_cannot_fit_is_an_error_naming_the_example(tokenizer, rows):
    with pytest.raises(DataError, match="example '1000'.*raise train.max_length"):
        encode_split(tokenizer, rows, max_length=2)


def test_collate_pads_only_to_the_batch_longest(tokenizer, rows):
    examples = encode_split(tokenizer, rows, max_length=512).examples[:3]
    batch = collate(examples, pad_id=tokenizer.pad_token_id)
    width = max(len(e.input_ids) for e in examples)
    assert batch["input_ids"].shape == (3, width)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        assert batch["input_ids"][row, :n].tolist() == e.input_ids
        assert batch["labels"][row, :n].tolist() == e.labels
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()
        assert (batch["labels"][row, n:] == IGNORE).all()


def test_epoch_batches_cover_everything_once_and_depend_on_seed_and_epoch():
    lengths = [(i * 37) % 101 for i in range(50)]
    batches = epoch_batches(lengths, 4, seed=0, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(50))
    assert batches == epoch_batches(lengths, 4, seed=0, epoch=0)
    assert batches != epoch_batches(lengths, 4, seed=0, epoch=1)
    assert batches != epoch_batches(lengths, 4, seed=1, epoch=0)


def test_bucketing_cuts_padding():
    lengths = [10 + (i * 37) % 200 for i in range(400)]
    plan = BatchPlan(lengths, [4, 4], epochs=1, seed=0)
    bucketed, plain = plan.padding_fraction(), unbucketed_padding_fraction(lengths, 4, seed=0)
    assert bucketed < plain / 3, (bucketed, plain)


@pytest.mark.parametrize("per_epoch, size", [(4, 8), (16, 8), (17, 8), (63, 31), (100, 50), (4000, 50)])
def test_a_bucket_holds_half_an_epoch_of_micro_batches_from_8_to_50(per_epoch, size):
    assert bucket_size(per_epoch) == size


def test_half_epoch_buckets_pad_far_less_and_still_group_each_epoch_differently():
    # 450 examples spread like PubMedQA's prompts, a step of 50 in micro-batches of 8 and 7
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.normal(337, 75, 450), 120, 512).astype(int).tolist()
    sizes = step_sizes(50, 8)
    plan = BatchPlan(lengths, sizes, epochs=3, seed=0)
    old = BatchPlan(lengths, sizes, epochs=3, seed=0, bucket_batches=8)
    assert (plan.per_epoch, plan.bucket_batches, old.bucket_batches) == (63, 31, 8)
    assert plan.padding_fraction() < old.padding_fraction() / 2, (plan.padding_fraction(), old.padding_fraction())
    # Two buckets an epoch: an example meets other examples each epoch.
    epochs = [{frozenset(b) for b in epoch_batches(lengths, sizes, 0, e, plan.bucket_batches)} for e in range(3)]
    assert len(epochs[0] & epochs[1]) < len(epochs[0]) / 4 and len(epochs[1] & epochs[2]) < len(epochs[1]) / 4
    for e in range(3):  # every example once an epoch, every step its sizes
        batches = epoch_batches(lengths, sizes, 0, e, plan.bucket_batches)
        assert sorted(i for b in batches for i in b) == list(range(450))
        assert [len(b) for b in batches[:len(sizes)]] == sizes


def test_plan_steps_run_through_epochs_in_order():
    lengths = list(range(10, 30))  # 20 examples, micro 2 -> 10 micro-batches per epoch
    plan = BatchPlan(lengths, [2] * 4, epochs=2.5, seed=3)
    assert plan.total_steps == 7  # ceil(25 / 4)
    stream = [b for s in range(plan.total_steps) for b in plan.step(s)]
    assert stream[:10] == epoch_batches(lengths, 2, 3, 0) and stream[10:20] == epoch_batches(lengths, 2, 3, 1)
    assert BatchPlan(lengths, [2] * 4, epochs=2.5, seed=3, max_steps=2).total_steps == 2
    assert plan.epoch_after(5) == 2.0


def test_equal_micro_batches_keep_the_data_order_of_earlier_versions():
    # A run resumed from a checkpoint written before uneven micro-batches existed must see the same
    # batches an uninterrupted run would have: these are what that code produced.
    lengths = [(i * 37) % 101 for i in range(11)]
    assert epoch_batches(lengths, 2, 5, 1, bucket_batches=2) == [[1], [7, 2], [3, 9], [5, 8], [0, 6], [4, 10]]
    plan = BatchPlan(lengths, [2, 2], epochs=2, seed=5)
    assert [plan.step(s) for s in range(plan.total_steps)] == [
        [[8], [7, 10]], [[0, 3], [6, 9]], [[2, 5], [1, 4]], [[8], [0, 3]], [[2, 5], [6, 9]], [[1, 4], [7, 10]]]


@pytest.mark.parametrize("examples, most, processes, sizes", [
    (50, 8, 1, [8, 7, 7, 7, 7, 7, 7]),
    (50, 9, 1, [9, 9, 8, 8, 8, 8]),
    (50, 5, 1, [5] * 10),  # a divisor: equal parts
    (50, 64, 1, [50]),
    (50, 8, 2, [7, 7, 6, 6, 6, 6, 6, 6]),  # 8 parts, 4 per process
    (48, 8, 2, [8] * 6),
    (7, 1, 1, [1] * 7),
])
def test_a_step_is_split_into_as_few_near_equal_micro_batches_as_fit(examples, most, processes, sizes):
    assert step_sizes(examples, most, processes) == sizes


def test_uneven_micro_batches_give_every_step_its_sizes_and_every_example_once_an_epoch():
    lengths = [10 + (i * 37) % 200 for i in range(100)]  # 2 steps of 50 an epoch
    sizes = step_sizes(50, 8)
    plan = BatchPlan(lengths, sizes, epochs=3, seed=1)
    assert (plan.micro, plan.accum, plan.total_steps, plan.micro_text) == (8, 7, 6, "7-8")
    for epoch in range(3):
        steps = [plan.step(s) for s in range(2 * epoch, 2 * epoch + 2)]
        assert all([len(b) for b in step] == sizes for step in steps)
        assert sorted(i for step in steps for b in step for i in b) == list(range(100))
    assert plan.step(0) != plan.step(2)  # each epoch its own order
    assert BatchPlan(lengths, sizes, epochs=3, seed=1).step(5) == plan.step(5)  # a resume needs only the step
    unbucketed = unbucketed_padding_fraction(lengths, 8, seed=1)
    assert plan.padding_fraction() < unbucketed / 3, (plan.padding_fraction(), unbucketed)


def test_a_step_across_an_epoch_end_never_exceeds_the_largest_micro_batch():
    lengths = [10 + i for i in range(45)]  # 45 = one step of 26 + 19: steps run across epochs
    sizes = step_sizes(26, 9)  # [9, 9, 8]
    plan = BatchPlan(lengths, sizes, epochs=4, seed=0)
    stream = [b for s in range(plan.total_steps) for b in plan.step(s)]
    assert all(len(b) <= 9 for b in stream)
    per_epoch = plan.per_epoch
    assert [len(b) for b in stream[:per_epoch]] == [9, 9, 8, 9, 9, 1]  # the rest cut as a step's first sizes
    for epoch in range(4):
        assert sorted(i for b in stream[epoch * per_epoch:(epoch + 1) * per_epoch] for i in b) == list(range(45))


@pytest.mark.parametrize("examples, micro, accumulation, epochs, steps", [
    (100, 2, 1, 1.1, 55),  # 1.1 * 50 micro-batches is 55.00000000000001 in floats
    (100, 2, 5, 1.1, 11),  # 50 micro-batches in 5s: 11 steps, not 12
    (200, 2, 1, 1.1, 110),
    (340, 2, 1, 1.1, 187),
    (20, 2, 4, 2.5, 7),  # a real fraction of a step still rounds up
    (30, 1, 1, 0.1, 3),
])
def test_plan_takes_the_steps_the_epochs_say_with_no_extra_step_from_float_noise(examples, micro, accumulation,
                                                                                 epochs, steps):
    assert BatchPlan([5] * examples, [micro] * accumulation, epochs, seed=0).total_steps == steps


@pytest.mark.parametrize("prompt, answer, blank", [
    ("  \n", "yes", "prompt"), ("Question: x? Answer:", " ", "answer"), ("", "", "prompt and answer")])
def test_blank_prompt_or_answer_is_refused_naming_file_row_and_fix(tmp_path, prompt, answer, blank):
    cols = toy_rows(3, "train")
    cols["prompt"][1], cols["answer"][1] = prompt, answer
    pq.write_table(pa.table({k: cols[k] for k in ("id", "prompt", "answer")}), tmp_path / "train.parquet")
    with pytest.raises(DataError, match=rf"train.parquet: row 1 \(id '1001'\) has an empty or whitespace-only "
                                        rf"{blank}; fix or drop that row .* format the data again"):
        read_split(tmp_path / "train.parquet")


def test_prompt_that_encodes_to_no_tokens_is_refused_naming_the_example(tokenizer, rows):
    # read_split refuses blank prompts first; this guards rows that reach encode_split otherwise.
    blank = {k: v[:2] for k, v in rows.items()}
    blank["prompt"] = [blank["prompt"][0], "  "]  # stripped before encoding, as the evaluator does
    with pytest.raises(DataError, match="example '1001': its prompt encodes to no tokens"):
        encode_split(tokenizer, blank, max_length=512)


def test_split_without_answer_column_names_file_and_column(tmp_path):
    cols = toy_rows(3, "train")
    pq.write_table(pa.table({"id": cols["id"], "prompt": cols["prompt"]}), tmp_path / "train.parquet")
    with pytest.raises(DataError, match=r"train.parquet lacks column\(s\) answer"):
        read_split(tmp_path / "train.parquet")


def test_missing_split_says_to_format_first(tmp_path):
    with pytest.raises(DataError, match="run the data formatting stage"):
        read_split(tmp_path / "train.parquet")
