"""Security: no pickle or foreign code on the load path, no leaked tokens, no path escapes.

Every user-supplied file is loaded as data: weights and adapters from safetensors (a .bin is
unpickled only by torch's weights-only loader, which refuses anything but tensors), optimizer
state from safetensors and JSON. A model's own Python code runs only when the config says
model.trust_remote_code: true, and the log says so. A hub token in the environment never
reaches a file or a log line, and names from configs or data never climb out of artifacts/.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest

from expert.artifacts import ArtifactStore, StageRequest
from expert.errors import ConfigError, DataError, ModelError
from tests.fixtures.data import write_mmlu_dir, write_mmlu_hf, write_pubmedqa_json

REPO = Path(__file__).resolve().parents[2]
TOKEN = "hf_PLANTEDtokenDoNotLeak0123456789abcdef"


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from tests.fixtures.models import tiny_llama_dir

    return tiny_llama_dir(tmp_path_factory.mktemp("llama"))


class Payload:
    """A pickle that runs a command when loaded: what a malicious .bin holds."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ---------------------------------------------------------------- pickles

# Calls that unpickle (or may) what they read. torch.load is allowed only with weights_only=True.
UNSAFE = [
    (re.compile(r"\bpickle\.loads?\("), "pickle.load"),
    (re.compile(r"\b(cloudpickle|dill|joblib)\b"), "a pickle library"),
    (re.compile(r"allow_pickle\s*=\s*True"), "numpy allow_pickle"),
    (re.compile(r"weights_only\s*=\s*False"), "torch.load(weights_only=False)"),
    (re.compile(r"use_safetensors\s*=\s*False"), "from_pretrained(use_safetensors=False)"),
]


def test_no_pickle_loading_anywhere_in_the_code():
    found = []
    for path in sorted([*REPO.glob("expert/**/*.py"), *REPO.glob("tasks/*.py"), *REPO.glob("flows/*.py")]):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for pattern, what in UNSAFE:
                if pattern.search(line):
                    found.append(f"{path.relative_to(REPO)}:{number}: {what}")
            if "torch.load(" in line and "weights_only=True" not in line:
                found.append(f"{path.relative_to(REPO)}:{number}: torch.load without weights_only=True")
    assert not found, found


def test_a_malicious_bin_model_is_refused_and_its_code_never_runs(llama_dir, tmp_path):
    from expert.models import ModelConfig, import_model, resolve_model_source

    folder = tmp_path / "bin_model"
    shutil.copytree(llama_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    marker = tmp_path / "code-ran"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": Payload(marker)}))
    config = ModelConfig(source=str(folder))
    with pytest.raises(ModelError, match=r"refused to load the \.bin weights.*bin_model.*safetensors"):
        import_model(config, resolve_model_source(config), tmp_path / "out")
    assert not marker.exists()


def test_adapters_load_from_safetensors_only(llama_dir, tmp_path):
    from expert.modeling import load_model

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2,
                                                             "target_modules": ["q_proj"]}))
    marker = tmp_path / "code-ran"
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ModelError, match="no adapter_model.safetensors; adapters are loaded from safetensors only"):
        load_model(llama_dir, adapter_dir=adapter, device="cpu")
    assert not marker.exists()


def test_checkpoints_hold_no_pickles():
    """Optimizer, scheduler and RNG state go to safetensors + JSON (stricter than
    torch.load(weights_only=True)); the resume tests in test_train_loop read them back."""
    from expert.train import checkpoint

    source = Path(checkpoint.__file__).read_text()
    assert "torch.load(" not in source and "import pickle" not in source
    assert checkpoint.OPTIMIZER.endswith(".safetensors") and checkpoint.RNG.endswith(".safetensors")


# ---------------------------------------------------------------- remote code

def remote_code_model(llama_dir: Path, folder: Path, marker: Path) -> Path:
    shutil.copytree(llama_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["EvilForCausalLM"], model_type="evil",
                  auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    return folder


def test_remote_code_is_off_by_default_everywhere():
    from expert.models import ModelConfig
    from expert.pipeline_config import load_config

    assert ModelConfig().trust_remote_code is False
    for preset in sorted(REPO.glob("configs/*.yaml")):
        assert load_config(preset).model.trust_remote_code is False, preset


def test_a_model_with_its_own_code_is_refused_and_the_code_never_runs(llama_dir, tmp_path):
    from expert.modeling import load_model
    from expert.models import ModelConfig, resolve_model_source

    marker = tmp_path / "code-ran"
    folder = remote_code_model(llama_dir, tmp_path / "evil", marker)
    with pytest.raises(ModelError, match="own Python code.*refused.*model.trust_remote_code=true"):
        resolve_model_source(ModelConfig(source=str(folder)))
    # A folder holding code but no consent record from the import stage: transformers is not
    # allowed to run the code, and the error says how consent is given.
    with pytest.raises(ModelError, match=r"needs its own Python code.*no consent.*remote_code\.json.*"
                                         r"model\.trust_remote_code: true"):
        load_model(folder, device="cpu")
    assert not marker.exists()


def custom_code_model(llama_dir: Path, folder: Path, marker: Path) -> Path:
    """The tiny Llama as a model that needs its own code (a subclass under a new model_type);
    importing that code touches `marker`."""
    shutil.copytree(llama_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["TinyCustomForCausalLM"], model_type="tinycustom",
                  auto_map={"AutoConfig": "custom.TinyCustomConfig",
                            "AutoModelForCausalLM": "custom.TinyCustomForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "custom.py").write_text(
        "import pathlib\n\nfrom transformers import LlamaConfig, LlamaForCausalLM\n\n"
        f"pathlib.Path({str(marker)!r}).touch()\n\n\n"
        "class TinyCustomConfig(LlamaConfig):\n    model_type = 'tinycustom'\n\n\n"
        "class TinyCustomForCausalLM(LlamaForCausalLM):\n    config_class = TinyCustomConfig\n")
    return folder


def test_consent_given_at_import_lets_later_stages_run_that_code_and_no_other(llama_dir, tmp_path):
    """model.trust_remote_code is the user's consent; the import stage records it with the code's
    digests, so quantize, train and eval load the model without asking again, and code changed
    after the import is refused."""
    from expert.modeling import CODE_CONSENT_FILE, load_model
    from expert.models import ModelConfig, import_model, resolve_model_source
    from expert.quantize.config import QuantizeConfig
    from expert.quantize.nf4 import write_record

    marker = tmp_path / "code-ran"
    source = custom_code_model(llama_dir, tmp_path / "custom", marker)
    config = ModelConfig(source=str(source), trust_remote_code=True)
    imported = tmp_path / "imported"
    import_model(config, resolve_model_source(config), imported)
    consent = json.loads((imported / CODE_CONSENT_FILE).read_text())
    assert list(consent["files"]) == ["custom.py"]

    # As the quantize stage leaves it for method none: a record pointing at the import.
    quantized = tmp_path / "quantized"
    quantized.mkdir()
    write_record(QuantizeConfig(method="none"), imported, quantized)
    model, tokenizer = load_model(quantized, device="cpu")
    assert type(model).__name__ == "TinyCustomForCausalLM" and marker.exists()
    ids = tokenizer("hello", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape[-1] == model.config.vocab_size

    (imported / "custom.py").write_text((imported / "custom.py").read_text() + "\nprint('changed')\n")
    with pytest.raises(ModelError, match=r"differs from what was imported.*custom\.py.*Rerun the import"):
        load_model(quantized, device="cpu")
    (imported / "custom.py").unlink()
    (imported / "extra.py").write_text("")
    with pytest.raises(ModelError, match=r"custom\.py, extra\.py"):
        load_model(quantized, device="cpu")


def test_turning_remote_code_on_is_logged(llama_dir, tmp_path, caplog):
    from expert.models import ModelConfig, resolve_model_source

    folder = remote_code_model(llama_dir, tmp_path / "evil", tmp_path / "code-ran")
    with caplog.at_level(logging.WARNING, logger="expert"):
        resolved = resolve_model_source(ModelConfig(source=str(folder), trust_remote_code=True))
    assert "model.trust_remote_code is on" in caplog.text and str(folder) in caplog.text
    assert resolved.kind == "local"  # resolving reads config.json only: nothing ran yet
    assert not (tmp_path / "code-ran").exists()


# ---------------------------------------------------------------- hub tokens

def run_stages(root: Path, llama_dir: Path, tmp_path: Path) -> None:
    """Every stage but the report (which only reads the others' JSON), run directly on a tiny model."""
    from expert.pipeline_config import load_config
    from expert.stages import Evaluate, FormatMMLU, FormatPubMedQA, ImportModel, Quantize, Select, Train
    from expert.workspace import Workspace

    overrides = [f"model.source={llama_dir}", f"data.pubmedqa.source={write_pubmedqa_json(tmp_path / 'p.json', n=60)}",
                 f"data.mmlu.source={write_mmlu_dir(tmp_path / 'mmlu', n_test=2)}", "quantize.method=none",
                 "train.max_steps=2", "train.save_every_steps=1", "train.micro_batch_size=2",
                 "train.effective_batch_size=2", "train.max_length=128", "eval.batch_size=8",
                 "eval.mmlu_max_per_subject=2", "eval.device=cpu"]
    config = load_config(None, overrides)
    assert TOKEN not in config.model_dump_json()  # the flow's Prefect parameters
    workspace = Workspace.at(root)

    def build(stage, section, **upstream):
        inputs = stage.fetch(section, workspace)
        request = stage.request(section, {k: v.ref() for k, v in upstream.items()}, inputs)
        paths = {k: v.path for k, v in upstream.items()}
        return workspace.store.build(request, lambda out: stage.produce(section, paths, inputs, out, None,
                                                                        workspace.store.work_dir(request)))

    model = build(ImportModel(), config.model)
    data = build(FormatPubMedQA(), config.data.pubmedqa, model=model)
    mmlu = build(FormatMMLU(), config.data.mmlu)
    quantized = build(Quantize(), config.quantize, model=model)
    trained = build(Train(), config.train, model=quantized, data=data)
    selected = build(Select(eval_config=config.eval), config.select, model=quantized, train=trained, data=data)
    adapter = type(selected)(selected.stage, selected.key, selected.path / "adapter", selected.manifest)
    build(Evaluate("pubmedqa"), config.eval, model=quantized, data=data, adapter=adapter)
    build(Evaluate("mmlu"), config.eval, model=model, data=mmlu)


@pytest.mark.slow
def test_a_hub_token_in_the_environment_reaches_no_artifact_and_no_log(llama_dir, tmp_path, monkeypatch, caplog):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.setenv(name, TOKEN)
    root = tmp_path / "artifacts"
    with caplog.at_level(logging.DEBUG):
        run_stages(root, llama_dir, tmp_path)
    files = [p for p in root.rglob("*") if p.is_file()]
    assert len({p.parent.parent.name for p in files if p.name == "manifest.json"}) == 7  # every stage wrote
    leaks = [str(p) for p in files if TOKEN.encode() in p.read_bytes()]
    assert not leaks, leaks
    assert TOKEN not in caplog.text


# ---------------------------------------------------------------- names that become paths

@pytest.mark.parametrize("stage, key", [("../outside", "0123456789abcdef"), ("train", "../../etc"),
                                        ("train", "/abs"), (".hidden", "k"), ("a/b", "k"), ("..", "k")])
def test_artifact_folders_cannot_escape_the_store(tmp_path, stage, key):
    store = ArtifactStore(tmp_path / "artifacts")
    with pytest.raises(ValueError, match="cannot name an artifact folder"):
        store.path(stage, key)
    if stage != "train":  # keys are hashes; a stage name comes from code, but is checked all the same
        with pytest.raises(ValueError):
            store.build(StageRequest(stage, 1, {}), lambda out: None)
    assert list(tmp_path.iterdir()) in ([], [tmp_path / "artifacts"])
    assert not list(tmp_path.rglob("*outside*"))


@pytest.mark.parametrize("subjects", [["../../etc/passwd"], ["anatomy", "../anatomy"], ["/tmp/x"]])
def test_mmlu_subjects_are_only_filters_over_known_names(tmp_path, subjects):
    """eval.mmlu_subjects never becomes a path: it selects rows of the formatted data, and a
    name the data does not hold is refused."""
    from expert.benchmarks.mmlu import MMLUConfig, format_mmlu
    from expert.evaluation import EvalConfig
    from expert.evaluation.runner import load_questions

    format_mmlu(MMLUConfig(num_shots=1), write_mmlu_dir(tmp_path / "mmlu", n_dev=1), tmp_path / "data")
    with pytest.raises(ConfigError, match="eval.mmlu_subjects: unknown subject"):
        load_questions(EvalConfig(mmlu_subjects=subjects), "mmlu", tmp_path / "data")


def test_mmlu_subject_folders_outside_the_list_are_refused(tmp_path):
    from expert.benchmarks.mmlu import find_subjects

    root = write_mmlu_hf(tmp_path / "hf", subjects=("anatomy",))
    (root / "..anatomy").mkdir()
    shutil.copy(next((root / "anatomy").glob("test-*.parquet")), root / "..anatomy" / "test-00000-of-00001.parquet")
    with pytest.raises(DataError, match="unknown MMLU subject '..anatomy'"):
        find_subjects(root)


@pytest.mark.parametrize("path", ["/x/..", "/x/%2e%2e", "/..%2f..%2fevil", "/", "/%2e", "/.bashrc"])
def test_download_names_stay_in_the_downloads_folder(path, tmp_path, monkeypatch):
    import io
    import urllib.request

    from expert import sources

    class Response(io.BytesIO):
        headers: dict = {}

    # The server answers whatever the URL's path says; the download names its file itself.
    monkeypatch.setattr(urllib.request, "urlopen", lambda request, timeout: Response(b"data"))
    downloads = tmp_path / "downloads"
    target = sources._download(f"https://example.org{path}", downloads, attempts=1)
    folder = target.parent
    assert folder.parent == downloads / "urls" and target.read_bytes() == b"data"
    assert target.name and not target.name.startswith(".") and target.name != "meta.json"
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == sorted(
        (target.relative_to(tmp_path).as_posix(), (folder / "meta.json").relative_to(tmp_path).as_posix()))


@pytest.mark.parametrize("source", ["hf:../../etc", "hf:..", "hf:org/../../x", "hf:org/..", "hf:a/b/c"])
def test_hub_dataset_names_are_validated_before_any_path_is_made(tmp_path, source, monkeypatch):
    import huggingface_hub

    from expert import sources
    from expert.fingerprint import FingerprintCache

    def must_not_run(*args, **kwargs):
        raise AssertionError("the hub was asked for a malformed name")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", must_not_run)
    with pytest.raises(DataError, match=r"data source 'hf:.*' is not a Hugging Face repository name: write hf:ORG/NAME"):
        sources.fetch(source, tmp_path / "dl", FingerprintCache())
    assert not (tmp_path / "dl").exists()  # no cache folder was made either


@pytest.mark.parametrize("source", ["hf:../../etc", "hf:org/../x"])
def test_hub_model_names_are_validated_before_the_hub_is_asked(source, monkeypatch):
    import huggingface_hub

    from expert.errors import ModelError
    from expert.models import ModelConfig, resolve_model_source

    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: pytest.fail("the hub was asked for a malformed name"))
    with pytest.raises(ModelError, match=r"model.source 'hf:.*' is not a Hugging Face repository name"):
        resolve_model_source(ModelConfig(source=source))


def test_a_gptq_model_keeps_the_consent_for_the_same_code(llama_dir, tmp_path):
    from expert.modeling import CODE_CONSENT_FILE, load_model, load_tokenizer
    from expert.models import ModelConfig, import_model, resolve_model_source
    from expert.quantize.config import QuantizeConfig
    from expert.quantize.gptq import check_group_size, run_gptq

    source = custom_code_model(llama_dir, tmp_path / "custom", tmp_path / "code-ran")
    config = ModelConfig(source=str(source), trust_remote_code=True)
    imported = tmp_path / "imported"
    import_model(config, resolve_model_source(config), imported)
    check_group_size(imported, 32)  # builds the model from its config: needs the code too
    tokenizer = load_tokenizer(imported)
    samples = [tokenizer(f"calibration text number {i} for the custom model", return_tensors="pt")
               for i in range(4)]
    out = tmp_path / "gptq"
    run_gptq(QuantizeConfig(method="gptq", group_size=32, num_samples=4), imported, samples, tokenizer, out)
    assert (out / CODE_CONSENT_FILE).read_text() == (imported / CODE_CONSENT_FILE).read_text()
    model, _ = load_model(out, device="cpu")
    assert type(model).__name__ == "TinyCustomForCausalLM"
    assert "TorchLinear" in {type(m).__name__ for m in model.modules()}  # gptqmodel's float32 CPU kernel
