"""Evaluation and selection fanned out as Prefect tasks through prefect-dask's DaskTaskRunner,
on a real dask.distributed cluster of 2 worker processes started here: the merged outputs
equal one process's, question by question."""

import json

import pandas as pd
import pytest
from prefect import flow

from expert.evaluation import EvalConfig, evaluate
from expert.evaluation.config import RunnerConfig
from expert.fanout import Piece, PieceFailed
from expert.select import score_checkpoints
from tasks.fanout import DaskFanOut
from tests.expert.eval_fixtures import llama_dir, mmlu_dir, pubmedqa_dir  # noqa: F401
from tests.expert.test_eval_adapter import save_adapter
from tests.fixtures.data import write_mmlu_dir, write_pubmedqa_json
from tests.fixtures.pipeline import final_task_runs

pytestmark = pytest.mark.slow

# Workers run torch on 1 thread, this process on several, and PubMedQA shards draw their
# batches (padding widths) from fewer questions: log-likelihoods may differ in the last
# float32 digits (SmolLM2-135M on MMLU: 7e-6 at most), predictions not at all. In bf16 ('auto'
# on a CPU with native bf16) PubMedQA shards differ by its rounding: these tests pin float32.
ATOL = 1e-5


@pytest.fixture(scope="module")
def cluster():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as local:
        yield local


def dask_config(cluster, **fields) -> EvalConfig:
    return EvalConfig.from_dict({"device": "cpu", "dtype": "float32", "batch_size": 2, **fields,
                                 "runner": {"kind": "dask", "address": cluster.scheduler_address}})


def task_run_names(flow_run_id, expected: list[str] = ()) -> list[str]:
    """The completed task runs' names, once those `expected` have reached the server (a piece's
    task run is reported by its dask worker, and may arrive after the flow has returned)."""
    def arrived(runs) -> bool:
        return set(expected) <= {r.name for r in runs} | {r.name.split(" (")[0] for r in runs}

    return sorted(r.name for r in final_task_runs(flow_run_id, until=arrived) if r.state.is_completed())


@flow
def fanned_out(config: EvalConfig, benchmark: str, model: str, data: str, out: str) -> dict:
    return evaluate(config, benchmark, model, data, out, fan_out=DaskFanOut(config.runner))


@pytest.mark.parametrize("benchmark", ["mmlu", "pubmedqa"])
def test_fanned_out_evaluation_equals_one_process(prefect_harness, cluster, benchmark, llama_dir, mmlu_dir,
                                                  pubmedqa_dir, tmp_path):
    config = dask_config(cluster)
    data = mmlu_dir if benchmark == "mmlu" else pubmedqa_dir
    state = fanned_out(config, benchmark, str(llama_dir), str(data), str(tmp_path / "split"), return_state=True)
    split = state.result()
    whole = evaluate(config, benchmark, llama_dir, data, tmp_path / "whole")  # no fan-out: this process

    pieces = split["timing"].pop("pieces")
    assert len(pieces) == 2 and sum(p["questions"] for p in pieces) == whole["n"]  # one piece per worker
    names = sorted(p["name"] for p in pieces)
    assert task_run_names(state.state_details.flow_run_id, names) == names
    if benchmark == "mmlu":  # 3 subjects in 3 categories: whole subjects per piece
        assert [p["name"].split(" (")[1] for p in pieces] == ["2 subjects, 8 questions)", "1 subject, 4 questions)"]
    assert {k: v for k, v in split.items() if k != "timing"} == {k: v for k, v in whole.items() if k != "timing"}
    a, b = (pd.read_parquet(tmp_path / run / "predictions.parquet") for run in ("whole", "split"))
    assert a["id"].tolist() == b["id"].tolist() and a["prediction"].tolist() == b["prediction"].tolist()
    pd.testing.assert_frame_equal(a, b, check_exact=False, atol=ATOL, rtol=0)
    if benchmark == "pubmedqa":
        assert (tmp_path / "split" / "pubmedqa_preds.json").read_text() == \
            (tmp_path / "whole" / "pubmedqa_preds.json").read_text()


@flow
def fanned_out_selection(dev_config, model, checkpoints, data, runner) -> list[dict]:
    return score_checkpoints(dev_config, model, checkpoints, data, fan_out=DaskFanOut(runner))


def test_fanned_out_selection_scores_equal_one_process(prefect_harness, cluster, llama_dir, pubmedqa_dir, tmp_path):
    checkpoints = [(step, save_adapter(llama_dir, tmp_path / f"step{step}", b))
                   for step, b in ((2, 0.02), (4, 0.05), (6, None))]
    dev = dask_config(cluster, pubmedqa_split="dev")
    state = fanned_out_selection(dev, llama_dir, checkpoints, pubmedqa_dir, dev.runner, return_state=True)
    split = state.result()
    whole = score_checkpoints(dev, llama_dir, checkpoints, pubmedqa_dir)  # one load, adapters swapped
    assert [r["step"] for r in split] == [2, 4, 6] and split == whole
    assert len({r["dev_loss"] for r in whole}) == 3  # the checkpoints do score differently
    steps = ["dev score step 2", "dev score step 4", "dev score step 6"]
    assert task_run_names(state.state_details.flow_run_id, steps) == steps


def test_an_unreachable_scheduler_names_the_setting_and_the_fixes(monkeypatch):
    import socket

    from expert.errors import ExpertError
    from tasks import fanout

    with socket.socket() as sock:  # a port nobody listens on once this closes
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr(fanout, "CONNECT_TIMEOUT", "2s")
    with pytest.raises(ExpertError, match=f"eval.runner.address: no dask scheduler answered at tcp://127.0.0.1:{port}") \
            as info:
        DaskFanOut(RunnerConfig(kind="dask", address=f"tcp://127.0.0.1:{port}")).width
    assert "dask scheduler" in str(info.value) and "eval.runner.kind: local" in str(info.value)


def test_a_failed_piece_fails_with_its_name(prefect_harness, cluster):
    fan_out = DaskFanOut(dask_config(cluster).runner)
    pieces = [Piece("good piece", json.loads, {"s": "[1]"}), Piece("pubmedqa shard 2/2", json.loads, {"s": "{"})]
    with pytest.raises(PieceFailed, match="piece 'pubmedqa shard 2/2' failed on the dask cluster: JSONDecodeError"):
        flow(lambda: fan_out(pieces), name="failing-piece")()
    assert fan_out([pieces[0]]) == [[1]]  # outside a flow too


def test_pieces_unfinished_at_the_deadline_fail_the_stage_naming_them(prefect_harness, cluster):
    import subprocess
    import time

    fan_out = DaskFanOut(RunnerConfig(kind="dask", address=cluster.scheduler_address, timeout_s=2))
    pieces = [Piece("quick piece", json.loads, {"s": "[1]"}),
              Piece("hung piece", subprocess.call, {"args": ["sleep", "6"]})]  # a worker that does not answer
    start = time.monotonic()
    with pytest.raises(PieceFailed, match="eval.runner.timeout_s: 1 of 2 pieces unfinished after 2 s \\('hung piece'\\)"):
        fan_out(pieces)
    assert time.monotonic() - start < 5.5  # the stage gave up at its deadline, not when the piece ended


def test_a_local_cluster_runs_one_piece_per_process_on_the_threads_asked_for(prefect_harness):
    import torch

    fan_out = DaskFanOut(RunnerConfig(kind="dask", workers=1, threads_per_worker=2))
    assert fan_out._cluster()["cluster_kwargs"]["threads_per_worker"] == 1  # dask's slots, not torch's threads
    assert fan_out([Piece("threads", torch.get_num_threads, {})]) == [2]


def test_evaluate_flow_with_the_dask_runner_and_the_same_cache_keys(prefect_harness, cluster, llama_dir, tmp_path):
    from expert.pipeline_config import DataConfig
    from flows.evaluate import evaluate_model

    data = DataConfig.from_dict({
        "pubmedqa": {"source": str(write_pubmedqa_json(tmp_path / "ori_pqal.json", n=24))},
        "mmlu": {"source": str(write_mmlu_dir(tmp_path / "mmlu", ("anatomy", "nutrition", "philosophy"), 2))}})
    config = dask_config(cluster)
    run = evaluate_model.with_options(flow_run_name="dask")
    state = run(str(llama_dir), data=data, evaluation=config, artifacts_dir=str(tmp_path / "a"), return_state=True)
    pieces = ["mmlu 1/2", "mmlu 2/2", "pubmedqa shard 1/2", "pubmedqa shard 2/2"]
    names = task_run_names(state.state_details.flow_run_id, pieces)
    assert [n.split(" (")[0] for n in names if n.startswith(("mmlu ", "pubmedqa shard"))] == pieces
    paths = state.result()

    # The runner is not in the key: the in-process run finds the same artifacts and computes nothing.
    local = config.model_copy(update={"runner": EvalConfig().runner})
    again = run(str(llama_dir), data=data, evaluation=local, artifacts_dir=str(tmp_path / "a"), return_state=True)
    assert again.result() == paths
    names = task_run_names(again.state_details.flow_run_id)
    assert not [n for n in names if n.startswith(("mmlu ", "pubmedqa shard"))]
    metrics = json.loads((tmp_path / "a" / paths["mmlu"].split("/a/")[1] / "metrics.json").read_text())
    assert metrics["n"] == 6 and len(metrics["timing"]["pieces"]) == 2
