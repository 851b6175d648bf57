"""Training examples: evaluator tokenization, prompt masking, left truncation, bucketed batches."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from expert.errors import DataError
from expert.train.data import (IGNORE, BatchPlan, collate, encode_split, epoch_batches, read_split,
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
    assert set(cut.truncated_ids) <= {pid for pid, e in zip(rows["id"], full) if len(e.input_ids) > limit}
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
    plan = BatchPlan(lengths, micro_batch_size=4, accumulation=2, epochs=1, seed=0)
    bucketed, plain = plan.padding_fraction(), unbucketed_padding_fraction(lengths, 4, seed=0)
    assert bucketed < plain / 3, (bucketed, plain)


def test_plan_steps_run_through_epochs_in_order():
    lengths = list(range(10, 30))  # 20 examples, micro 2 -> 10 micro-batches per epoch
    plan = BatchPlan(lengths, micro_batch_size=2, accumulation=4, epochs=2.5, seed=3)
    assert plan.total_steps == 7  # ceil(25 / 4)
    stream = [b for s in range(plan.total_steps) for b in plan.step(s)]
    assert stream[:10] == epoch_batches(lengths, 2, 3, 0) and stream[10:20] == epoch_batches(lengths, 2, 3, 1)
    assert BatchPlan(lengths, 2, 4, epochs=2.5, seed=3, max_steps=2).total_steps == 2
    assert plan.epoch_after(5) == 2.0


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
    assert BatchPlan([5] * examples, micro, accumulation, epochs, seed=0).total_steps == steps


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
