"""Evaluation in pieces, in this process: the plan, the merge, the runner config and the keys.

The same pieces on a real dask cluster: tests/flows/test_fanout.py.
"""

import json

import pandas as pd
import pytest

from expert.errors import ConfigError, ExpertError
from expert.evaluation import EvalConfig, evaluate
from expert.evaluation.pieces import merge_pieces, shard_bounds, subject_groups
from expert.fanout import InProcess, Piece, PieceFailed
from expert.pipeline_config import PipelineConfig
from expert.select import SelectConfig
from expert.stages import Evaluate, Select
from tests.expert.eval_fixtures import llama_dir, mmlu_dir, pubmedqa_dir  # noqa: F401

DASK = {"kind": "dask", "address": "tcp://127.0.0.1:8786"}


@pytest.mark.parametrize("subjects, count, expected", [
    # sizes a=5, b=3, c=2, d=2, largest first into the emptiest group: a|b, c joins b (3 < 5),
    # d goes to the first of two equal groups (5 = 5)
    (list("aaaaabbbccdd"), 2, [(["a", "d"], 7), (["b", "c"], 5)]),
    (list("aaaaabbbccdd"), 3, [(["a"], 5), (["b"], 3), (["c", "d"], 4)]),
    # equal sizes go in data order (d before c); a group lists its subjects in data order
    (list("ddccbbbaaaaa"), 2, [(["c", "a"], 7), (["d", "b"], 5)]),
    (list("ab"), 4, [(["a"], 1), (["b"], 1)]),  # never an empty piece
])
def test_subject_groups_balance_whole_subjects(subjects, count, expected):
    assert subject_groups(subjects, count) == expected


@pytest.mark.parametrize("total, count, expected", [
    (7, 2, [(0, 3), (3, 7)]), (6, 3, [(0, 2), (2, 4), (4, 6)]), (2, 5, [(0, 1), (1, 2)]),
])
def test_shards_cover_every_row_once(total, count, expected):
    assert shard_bounds(total, count) == expected


def test_merge_restores_order_and_rejects_gaps_and_overlaps():
    frame = pd.DataFrame({"id": ["q1", "q2", "q3"]})
    mode = {"one_pass_questions": 1, "prefix_cache": False}
    pieces = [Piece("p1", print), Piece("p2", print)]
    results = [{"ids": ["q3"], "scores": [[3.0]], "mode": mode},
               {"ids": ["q1", "q2"], "scores": [[1.0], [2.0]], "mode": {**mode, "one_pass_questions": 2}}]
    scores, merged = merge_pieces(frame, pieces, results)
    assert scores == [[1.0], [2.0], [3.0]] and merged["one_pass_questions"] == 3
    with pytest.raises(ExpertError, match="q1 was scored by two pieces \\(the last: 'p2'\\)"):
        merge_pieces(frame, pieces, [results[1], results[1]])
    with pytest.raises(ExpertError, match="scored 1 questions, the evaluation has 3 \\(missing e.g. q1, q2\\)"):
        merge_pieces(frame, pieces[:1], results[:1])


@pytest.mark.slow
@pytest.mark.parametrize("benchmark, width", [("mmlu", 2), ("pubmedqa", 3)])
def test_in_process_pieces_equal_one_process(benchmark, width, llama_dir, mmlu_dir, pubmedqa_dir, tmp_path):
    data = mmlu_dir if benchmark == "mmlu" else pubmedqa_dir
    config = EvalConfig(device="cpu", dtype="float32", batch_size=2)  # the 1e-5 below holds in float32
    whole = evaluate(config, benchmark, llama_dir, data, tmp_path / "whole")
    ticks = []
    split = evaluate(config, benchmark, llama_dir, data, tmp_path / "split", fan_out=InProcess(width),
                     progress=lambda done, total: ticks.append((done, total)))
    assert len(split["timing"].pop("pieces")) == width and ticks[-1] == (whole["n"], whole["n"])
    assert {k: v for k, v in split.items() if k != "timing"} == {k: v for k, v in whole.items() if k != "timing"}
    a, b = (pd.read_parquet(tmp_path / run / "predictions.parquet") for run in ("whole", "split"))
    pd.testing.assert_frame_equal(a, b, check_exact=False, atol=1e-5, rtol=0)


def test_pieces_scored_on_different_devices_or_dtypes_are_refused():
    from expert.evaluation.pieces import _same_precision

    pieces = [Piece("mmlu 1/2", print), Piece("mmlu 2/2", print)]
    gpu = {"device": "cuda:0", "dtype": "bfloat16"}
    _same_precision(pieces, [gpu, {**gpu, "device": "cuda:1"}])  # two GPUs of one kind: one result
    with pytest.raises(ExpertError, match="'mmlu 1/2' on cuda in bfloat16; 'mmlu 2/2' on cpu in float32\\): "
                                          "set eval.device and eval.dtype"):
        _same_precision(pieces, [gpu, {"device": "cpu", "dtype": "float32"}])


def test_a_failed_piece_is_named():
    pieces = [Piece("good", json.loads, {"s": "[1]"}), Piece("mmlu 2/2 (bad)", json.loads, {"s": "{"})]
    with pytest.raises(PieceFailed, match="piece 'mmlu 2/2 \\(bad\\)' failed: JSONDecodeError"):
        InProcess()(pieces)


@pytest.mark.parametrize("runner, message", [
    ({"kind": "ray"}, "'eval.runner.kind': Input should be 'local' or 'dask' \\(got 'ray'\\)"),
    ({"address": "tcp://h:8786"}, "address: used with kind 'dask' only; set kind: dask"),
    ({"kind": "dask", "address": "h"}, "address 'h' is not a scheduler address; give e.g. 'tcp://host:8786'"),
    ({**DASK, "workers": 2}, "give address .* or workers .*, not both"),
    ({"kind": "dask", "workers": 0}, "'eval.runner.workers': Input should be greater than or equal to 1"),
    ({"kind": "dask", "worker": 2}, "unknown key 'eval.runner.worker' \\(did you mean 'workers'\\?\\)"),
    ({"timeout_s": 600}, "timeout_s: used with kind 'dask' only"),
    ({**DASK, "timeout_s": 0}, "'eval.runner.timeout_s': Input should be greater than 0"),
])
def test_runner_config_names_the_bad_field_and_the_fix(runner, message):
    with pytest.raises(ConfigError, match=message):
        EvalConfig.from_dict({"runner": runner}, where="eval")


@pytest.mark.parametrize("address", ["tcp://10.0.0.5:8786", "scheduler:8786", "tls://host.example:8786",
                                     "tcp://[::1]:8786", "[::1]:8786", "tcp://[::ffff:10.0.0.5]:8786"])
def test_runner_takes_the_addresses_dask_takes(address):
    assert EvalConfig.from_dict({"runner": {"kind": "dask", "address": address}}).runner.address == address


@pytest.mark.parametrize("address", ["tcp://::1:8786", "tcp://[::1]", "tcp://[host]:8786", "tcp://[::1:8786"])
def test_runner_rejects_malformed_addresses(address):
    with pytest.raises(ConfigError, match="is not a scheduler address"):
        EvalConfig.from_dict({"runner": {"kind": "dask", "address": address}}, where="eval")


def test_runner_is_in_no_cache_key():
    local, dask = EvalConfig(), EvalConfig.from_dict({"runner": DASK})
    assert "runner" not in local.canonical()
    for stage in (Evaluate("mmlu"), Evaluate("pubmedqa")):
        assert stage.key_config(local) == stage.key_config(dask)
    assert Select(eval_config=local).key_config(SelectConfig()) == Select(eval_config=dask).key_config(SelectConfig())
    assert PipelineConfig().canonical() == PipelineConfig(eval=dask).canonical()  # the report's key
    assert PipelineConfig(eval=dask).model_dump()["eval"]["runner"]["kind"] == "dask"  # a flow parameter keeps it
