"""The whole pipeline on a tiny model through Prefect: what runs, what is `Cached`, and why."""

import json
import shutil

import pytest

from tests.fixtures.data import write_pubmedqa_json
from tests.fixtures.pipeline import final_task_runs, tiny_config, tiny_inputs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return tiny_inputs(tmp_path_factory.mktemp("inputs"))


make_config = tiny_config


def run(config, force=None) -> tuple[dict[str, str], dict]:
    """Run the flow; return ({stage task name without its key: final state name}, result)."""
    from flows.pipeline import pipeline

    state = pipeline(config=config, force=force, return_state=True)
    assert state.is_completed(), state
    runs = final_task_runs(state.state_details.flow_run_id)
    states = {r.name.split(" [")[0]: r.state.name for r in runs if not r.name.startswith("fetch")}
    return states, state.result()


STAGES = {"import model", "format pubmedqa fold 0", "format mmlu", "quantize gptq 4-bit", "train LoRA r4",
          "select by dev accuracy", "evaluate pubmedqa (base)", "evaluate pubmedqa (quantized)",
          "evaluate pubmedqa (expert)", "evaluate mmlu (base)", "evaluate mmlu (expert)", "report"}


def reran(states: dict[str, str]) -> set[str]:
    assert set(states.values()) <= {"Completed", "Cached"}, states
    return {name for name, state in states.items() if state == "Completed"}


def test_pipeline_end_to_end_and_cache_behaviour(prefect_harness, inputs):
    states, result = run(make_config(inputs))
    assert set(states) == STAGES and reran(states) == STAGES

    summary = json.loads((inputs["artifacts"] / "report").glob("*/summary.json").__next__().read_text())
    assert set(summary["pubmedqa"]) == {"base", "quantized", "expert"} and set(summary["mmlu"]) == {"base", "expert"}
    for metrics in summary["pubmedqa"].values():
        assert 0 <= metrics["accuracy"] <= 1 and metrics["n"] == 30
    assert set(summary["timings_s"]) >= {"quantize", "train", "select"}
    adapter = result["expert"]["adapter"]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in __import__("pathlib").Path(adapter).iterdir()}

    # The tables and reports show in the UI, on the flow run.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    keys = ["pubmedqa-base-comparison", "pubmedqa-expert-confusion", "mmlu-expert-subjects",
            "checkpoint-dev-scores", "expert-report"]
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
    assert {a.key for a in found} == set(keys)

    select_dir = next((inputs["artifacts"] / "select").iterdir())
    scores = json.loads((select_dir / "scores.json").read_text())
    chosen = json.loads((select_dir / "selection.json").read_text())
    assert [r["step"] for r in scores] == [2, 4]
    assert chosen["score"] == max(r["accuracy"] for r in scores) and (select_dir / "dev_scores.png").is_file()

    # Nothing changed: no stage executes.
    states, _ = run(make_config(inputs))
    assert reran(states) == set()

    # Rerun from a stage: train and everything after it, although nothing changed.
    states, _ = run(make_config(inputs), force=["train"])
    assert reran(states) == {"train LoRA r4", "select by dev accuracy", "evaluate pubmedqa (expert)",
                             "evaluate mmlu (expert)", "report"}
    states, _ = run(make_config(inputs))
    assert reran(states) == set()

    # A new learning rate: train and everything after it, nothing before.
    states, _ = run(make_config(inputs, train={"learning_rate": 0.002}))
    assert reran(states) == {"train LoRA r4", "select by dev accuracy", "evaluate pubmedqa (expert)",
                             "evaluate mmlu (expert)", "report"}

    # A new MMLU subset: the MMLU evaluations and the report only.
    states, _ = run(make_config(inputs, eval={"mmlu_max_per_subject": 2}))
    assert reran(states) == {"evaluate mmlu (base)", "evaluate mmlu (expert)", "report"}

    # A deleted artifact reruns that stage only, even though Prefect remembers its result; its
    # content is the same, so nothing downstream reruns.
    folders = list((inputs["artifacts"] / "format_mmlu").iterdir())
    shutil.rmtree(folders[0])
    states, _ = run(make_config(inputs))
    assert reran(states) == {"format mmlu"}
    assert (folders[0] / "manifest.json").is_file()

    # So do a deleted quantized model and a deleted training run: on the CPU they rebuild the same
    # weights, with other timings and logs, which are reports and not content (Stage.report_files).
    for stage, task in (("quantize", "quantize gptq 4-bit"), ("train", "train LoRA r4")):
        for folder in (inputs["artifacts"] / stage).iterdir():
            if folder.is_dir() and not folder.name.startswith("."):
                shutil.rmtree(folder)
        states, _ = run(make_config(inputs))
        assert reran(states) == {task}, stage


def test_changed_input_file_reruns_what_reads_it(prefect_harness, inputs, tmp_path):
    data = write_pubmedqa_json(tmp_path / "ori_pqal.json", n=60)
    config = make_config(inputs, artifacts=tmp_path / "artifacts", quantize={"method": "none"},
                         data={"pubmedqa": {"source": str(data)}, "mmlu": None})
    states, _ = run(config)
    assert "evaluate pubmedqa (quantized)" not in states and "evaluate mmlu (base)" not in states
    data.write_text(data.read_text().replace("mortality", "morbidity"))
    states, _ = run(config)
    assert "import model" not in reran(states) and "quantize none" not in reran(states)
    assert {"format pubmedqa fold 0", "train LoRA r4", "evaluate pubmedqa (base)"} <= reran(states)


def test_a_deployment_run_with_a_missing_data_path_fails_before_any_stage(tmp_path, monkeypatch):
    """A deployment run does not go through `expert run`: the flow checks local inputs itself."""
    from expert.errors import ConfigError
    from expert.pipeline_config import load_preset
    from flows import pipeline as module

    monkeypatch.setattr(module, "import_model", lambda *a, **k: pytest.fail("a stage ran"))
    config = load_preset("default", [f"data.pubmedqa.source={tmp_path / 'ori_pqal.jsn'}"])
    with pytest.raises(ConfigError, match=r"data.pubmedqa.source '.*ori_pqal.jsn' does not exist"):
        module.pipeline.fn(config=config)


def test_a_partial_config_parameter_is_said_at_the_start(tmp_path, monkeypatch):
    """`--param config='{"train": {...}}'` replaces the whole preset: the run says what took the defaults."""
    import logging

    from expert.pipeline_config import PipelineConfig, load_preset
    from flows import pipeline as module

    class Stop(Exception):
        pass

    def first_stage(*args, **kwargs):
        raise Stop

    # Heard on the logger itself, not through caplog's handler on the root: Prefect's first logging
    # set-up in a process replaces the root's handlers (run alone, this test was that first).
    said: list[str] = []
    heard = logging.Handler(logging.WARNING)
    heard.emit = lambda record: said.append(record.getMessage())
    logger = logging.getLogger("expert.pipeline_config")
    monkeypatch.setattr(logger, "handlers", [*logger.handlers, heard])
    monkeypatch.setattr(module, "import_model", first_stage)
    partial = PipelineConfig.model_validate({"train": {"learning_rate": 0.0003}})
    with pytest.raises(Stop):
        module.pipeline.fn(config=partial)
    (words,) = said
    assert words.startswith("the config leaves out name, artifacts_dir, model, data, quantize, select, eval: they "
                            "take the built-in defaults") and "expert params configs/default.yaml" in words
    said.clear()
    whole = PipelineConfig.model_validate(load_preset("default").model_dump(mode="json"))  # as `expert params` gives
    with pytest.raises(Stop):
        module.pipeline.fn(config=whole)
    assert not said
