"""What goes into each stage's key, and what must not."""

import json
from types import SimpleNamespace

import pytest

from expert.benchmarks.pubmedqa import PubMedQAConfig
from expert.evaluation import EvalConfig
from expert.quantize import QuantizeConfig
from expert.stages import Evaluate, FormatPubMedQA, ImportModel, Quantize
from expert.models import ModelConfig


def src(fp):
    return SimpleNamespace(fingerprint=fp)


def test_source_location_is_not_in_the_key_but_its_content_is():
    stage = FormatPubMedQA()
    a = stage.request(PubMedQAConfig(source="/data/a/ori_pqal.json"), {}, {"source": src("sha256:1")})
    b = stage.request(PubMedQAConfig(source="https://x/ori_pqal.json"), {}, {"source": src("sha256:1")})
    c = stage.request(PubMedQAConfig(source="/data/a/ori_pqal.json"), {}, {"source": src("sha256:2")})
    d = stage.request(PubMedQAConfig(source="/data/a/ori_pqal.json", fold=1), {}, {"source": src("sha256:1")})
    assert a.key == b.key and len({a.key, c.key, d.key}) == 3


def test_model_key_follows_dtype_and_content():
    stage = ImportModel()
    base = stage.request(ModelConfig(source="gguf:a.gguf"), {}, {"source": src("x")})
    assert base.key == stage.request(ModelConfig(source="gguf:b.gguf"), {}, {"source": src("x")}).key
    assert base.key != stage.request(ModelConfig(source="gguf:a.gguf", dtype="bfloat16"), {}, {"source": src("x")}).key
    assert base.key != stage.request(ModelConfig(source="gguf:a.gguf"), {}, {"source": src("y")}).key


def _data_ref(tmp_path, digest, names=("test.parquet", "dev.parquet"), stage="format", key=None):
    """A ref to an artifact folder whose manifest lists `names`, each with content `digest`."""
    key = key or f"k-{digest}"
    folder = tmp_path / key
    folder.mkdir()
    files = {n: {"size": 1, "sha256": digest} for n in names}
    (folder / "manifest.json").write_text(__import__("json").dumps({"key": key, "files": files}))
    return {"stage": stage, "key": key, "path": str(folder)}


def _model_ref(tmp_path, digest="m1"):
    return _data_ref(tmp_path, digest, ("model.safetensors",), "import_model")


def test_evaluation_key_ignores_the_other_benchmarks_settings(tmp_path):
    data = _data_ref(tmp_path, "d1")
    model = _model_ref(tmp_path)
    pubmedqa = Evaluate("pubmedqa")
    mmlu = Evaluate("mmlu")
    up = {"model": model, "data": data}
    for mmlu_only in (EvalConfig(mmlu_max_per_subject=3), EvalConfig(prefix_cache=False)):
        assert pubmedqa.request(EvalConfig(), up, {}).key == pubmedqa.request(mmlu_only, up, {}).key
        assert mmlu.request(EvalConfig(), up, {}).key != mmlu.request(mmlu_only, up, {}).key


def test_evaluation_key_follows_the_split_content_not_the_data_key(tmp_path):
    model = _model_ref(tmp_path)
    same = _data_ref(tmp_path, "d1")
    other_key_same_content = _data_ref(tmp_path, "d1", key="another-fold")
    stage = Evaluate("pubmedqa")
    assert stage.request(EvalConfig(), {"model": model, "data": same}, {}).key == \
        stage.request(EvalConfig(), {"model": model, "data": other_key_same_content}, {}).key
    assert stage.request(EvalConfig(), {"model": model, "data": same}, {}).key != \
        stage.request(EvalConfig(), {"model": model, "data": _data_ref(tmp_path, "d2")}, {}).key
    adapter = _data_ref(tmp_path, "a1", ("adapter_model.safetensors",), "train")
    assert stage.request(EvalConfig(), {"model": model, "data": same}, {}).key != \
        stage.request(EvalConfig(), {"model": model, "data": same, "adapter": adapter}, {}).key


def test_quantize_key_holds_only_the_settings_its_method_uses(tmp_path):
    """nf4 and none write no weights: a GPTQ setting changed under them must not rerun them (and training)."""
    up = {"model": _model_ref(tmp_path)}
    gptq_only = {"group_size": 128, "num_samples": 8, "desc_act": True, "damp_percent": 0.1, "calibration": "c.txt",
                 "max_length": 64, "seed": 3}

    def key(**fields):
        return Quantize().request(QuantizeConfig(**fields), up, {}).key

    for method in ("nf4", "none"):
        # the pipeline gives them no data, so their perplexity check's settings change nothing either
        assert key(method=method) == key(method=method, **gptq_only) == key(method=method, perplexity_samples=0)
    assert all(key() != key(**{name: value}) for name, value in gptq_only.items())


def test_what_only_the_quantize_report_reads_leaves_its_key(tmp_path):
    """The perplexity check writes report files: its sample count, and the formatted data when a
    calibration file is given, must not rebuild the base (and retrain everything after it)."""
    model = _model_ref(tmp_path)

    def key(data, **fields):
        return Quantize().request(QuantizeConfig(**fields), {"model": model, "data": data}, {}).key

    d1, d2 = _data_ref(tmp_path, "d1"), _data_ref(tmp_path, "d2")
    assert key(d1) == key(d1, perplexity_samples=0) == key(d1, perplexity_samples=64)
    assert key(d1, calibration="c.txt") == key(d2, calibration="c.txt")
    assert key(d1) != key(d2)  # task calibration reads the data: it is an input of the weights


@pytest.mark.slow
def test_the_same_run_in_a_store_elsewhere_gets_the_same_keys(tmp_path, monkeypatch):
    """Keys follow content, not where the store lives: the trained adapters name their base by its
    place in the store (quantize/KEY). With the store's absolute path in them (adapter_config.json,
    README.md), a moved store or another checkout rebuilt selection, evaluation and report. That
    name is no local path, and saving a checkpoint must not look it up on the Hub."""
    import peft.utils.save_and_load

    from tests.fixtures.pipeline import stage_store, tiny_inputs

    def no_hub(repo, filename, *args, **kwargs):
        raise AssertionError(f"a checkpoint save asked the Hub for {repo}/{filename}")

    monkeypatch.setattr(peft.utils.save_and_load, "check_file_exists_on_hf_hub", no_hub)

    inputs = tiny_inputs(tmp_path / "inputs")
    _, here = stage_store(tmp_path / "here", "gptq", inputs)
    _, there = stage_store(tmp_path / "somewhere" / "else", "gptq", inputs)
    assert {role: path.name for role, path in here.items()} == {role: path.name for role, path in there.items()}
    saved = json.loads((here["select"] / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == f"quantize/{here['quantized'].name}"
