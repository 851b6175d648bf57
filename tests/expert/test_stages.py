"""What goes into each stage's key, and what must not."""

from types import SimpleNamespace

from expert.benchmarks.pubmedqa import PubMedQAConfig
from expert.evaluation import EvalConfig
from expert.stages import Evaluate, FormatPubMedQA, ImportModel
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


def _data_ref(tmp_path, digest):
    folder = tmp_path / digest
    folder.mkdir()
    files = {n: {"size": 1, "sha256": digest} for n in ("test.parquet", "dev.parquet")}
    (folder / "manifest.json").write_text(__import__("json").dumps({"files": files}))
    return {"stage": "format", "key": f"k-{digest}", "path": str(folder)}


def test_evaluation_key_ignores_the_other_benchmarks_settings(tmp_path):
    data = _data_ref(tmp_path, "d1")
    model = {"stage": "import_model", "key": "m1", "path": "/m"}
    pubmedqa = Evaluate("pubmedqa")
    mmlu = Evaluate("mmlu")
    cfg, subset = EvalConfig(), EvalConfig(mmlu_max_per_subject=3)
    assert pubmedqa.request(cfg, {"model": model, "data": data}, {}).key == \
        pubmedqa.request(subset, {"model": model, "data": data}, {}).key
    assert mmlu.request(cfg, {"model": model, "data": data}, {}).key != \
        mmlu.request(subset, {"model": model, "data": data}, {}).key


def test_evaluation_key_follows_the_split_content_not_the_data_key(tmp_path):
    model = {"stage": "import_model", "key": "m1", "path": "/m"}
    same = _data_ref(tmp_path, "d1")
    other_key_same_content = {**same, "key": "another-fold"}
    stage = Evaluate("pubmedqa")
    assert stage.request(EvalConfig(), {"model": model, "data": same}, {}).key == \
        stage.request(EvalConfig(), {"model": model, "data": other_key_same_content}, {}).key
    assert stage.request(EvalConfig(), {"model": model, "data": same}, {}).key != \
        stage.request(EvalConfig(), {"model": model, "data": _data_ref(tmp_path, "d2")}, {}).key
    adapter = {"stage": "train", "key": "a1", "path": "/a"}
    assert stage.request(EvalConfig(), {"model": model, "data": same}, {}).key != \
        stage.request(EvalConfig(), {"model": model, "data": same, "adapter": adapter}, {}).key
