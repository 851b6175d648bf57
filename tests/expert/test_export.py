"""`expert export`: the selected expert as one folder that loads and answers without EXPERT.

The store is built by the real stages on the tiny fixture model (no Prefect): import, format,
quantize, train, select and the expert's PubMedQA evaluation.
"""

import json
import os
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from expert.errors import ExpertError
from expert.export import export_expert
from tests.fixtures.pipeline import stage_store

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def plain_store(tmp_path_factory):
    return stage_store(tmp_path_factory.mktemp("plain"), "none")


@pytest.fixture(scope="module")
def gptq_store(tmp_path_factory):
    return stage_store(tmp_path_factory.mktemp("gptq"), "gptq")


def _card_answer(folder: Path, monkeypatch):
    """Run the model card's code block as a user would, from the exported folder."""
    code = re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S).group(1)
    monkeypatch.chdir(folder)
    namespace: dict = {}
    exec(compile(code, str(folder / "README.md"), "exec"), namespace)
    return namespace


def test_a_plain_base_export_answers_as_the_evaluate_stage_scored_it(plain_store, tmp_path, monkeypatch):
    _, found = plain_store
    out = tmp_path / "expert"
    out.mkdir()
    info = export_expert(found["select"], out)

    # Portable: the adapter names its base as the sibling folder, not the store's absolute path.
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "base"
    assert (out / "base" / "config.json").is_file() and not (out / "base" / "manifest.json").exists()
    assert info["base"]["kind"] == "none" and info["prompt"]["choices"] == ["yes", "no", "maybe"]
    # The report the pipeline made from this selection names the model's source and the run.
    assert info["name"] == "tiny" and info["base"]["source"].endswith("model")
    expert_rows = [r for r in info["results"] if r["model"] == "expert"]
    scored = json.loads((found["expert_eval"] / "metrics.json").read_text())
    assert expert_rows == [{"model": "expert", "benchmark": "pubmedqa", "split": "test", "n": scored["n"],
                            "accuracy": scored["accuracy"], "macro_f1": scored["macro_f1"]}]

    # The card's code, run from the export, gives the evaluate stage's answers (both float32).
    answer = _card_answer(out, monkeypatch)["answer"]
    predictions = pd.read_parquet(found["expert_eval"] / "predictions.parquet")
    test = pd.read_parquet(found["data"] / "test.parquet").set_index("id")
    labels = ("yes", "no", "maybe")
    logliks = predictions[[f"loglik_{c}" for c in labels]].to_numpy(copy=True)
    ranked = logliks.argsort(axis=1)[:, ::-1]  # each question's choices, most likely first
    ordered = [[labels[j] for j in row] for row in ranked]
    margins = [sorted(row)[::-1] for row in logliks]
    sure = [i for i, m in enumerate(margins) if m[0] - m[1] > 1e-3 and m[1] - m[2] > 1e-3][:6]  # no near ties
    assert len(sure) >= 4, predictions
    for i in sure:
        prompt = test.loc[predictions["id"][i], "prompt"]
        assert answer(prompt) == predictions["prediction"][i] == ordered[i][0]
        # Without the winner, the runner-up: the card ranks the choices as EXPERT scored them.
        assert answer(prompt, choices=tuple(c for c in labels if c != ordered[i][0])) == ordered[i][1]


def test_the_export_is_checked_and_verifiable(plain_store, tmp_path, capsys):
    from expert.cli import main

    _, found = plain_store
    out = tmp_path / "expert"
    assert main(["export", str(found["select"]), "--out", str(out)]) == 0
    assert main(["verify", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert "The `lm-eval` template" in card and "answer: " in card and "| pubmedqa (test) | the expert |" in card

    # The report made from the selection leads to the same expert.
    from_report = tmp_path / "from-report"
    from_report.mkdir()
    assert export_expert(found["report"], from_report)["exported_from"] == \
        json.loads((out / "expert.json").read_text())["exported_from"]

    # A report written before reports named the expert says so.
    old_report = tmp_path / "old-report"
    shutil.copytree(found["report"], old_report)
    summary = json.loads((old_report / "summary.json").read_text())
    del summary["expert"]
    (old_report / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(ExpertError, match=r"the report .* names no expert .* give the select artifact"):
        export_expert(old_report, tmp_path / "never0")

    # A damaged adapter in the store is reported, not exported.
    damaged = tmp_path / "store-copy"
    shutil.copytree(found["select"].parent.parent, damaged)
    select_copy = damaged / "select" / found["select"].name
    with open(select_copy / "adapter" / "adapter_model.safetensors", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(ExpertError, match=r"the select artifact is damaged .*adapter_model.safetensors.* delete"):
        export_expert(select_copy, tmp_path / "never")

    # So is a base the selection no longer matches, and a missing one.
    quantized_copy = damaged / "quantize" / found["quantized"].name
    shutil.rmtree(damaged / "select")
    shutil.copytree(found["select"], select_copy)
    manifest = json.loads((quantized_copy / "manifest.json").read_text())
    manifest["files"]["quantization.json"]["sha256"] = "0" * 64
    (quantized_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExpertError, match=r"model artifact .* was rebuilt after the selection"):
        export_expert(select_copy, tmp_path / "never2")
    shutil.rmtree(quantized_copy)
    with pytest.raises(ExpertError, match=r"model artifact \w+ that the selection \w+ was made from is not in"):
        export_expert(select_copy, tmp_path / "never3")
    assert main(["export", str(found["data"]), "--out", str(tmp_path / "never4")]) == 2
    assert "is a format_pubmedqa artifact, not a select one" in capsys.readouterr().err


def test_a_gptq_export_loads_through_transformers_and_answers(gptq_store, tmp_path, monkeypatch):
    _, found = gptq_store
    out = tmp_path / "expert"
    out.mkdir()
    info = export_expert(found["select"] / "adapter", out)  # the adapter folder, as `expert run` names it
    assert info["base"]["kind"] == "gptq" and info["base"]["quantization"]["bits"] == 4
    assert (out / "base" / "quantize_config.json").is_file()
    assert not list((out / "base").glob("quantization_report*"))  # the store's reports stay there
    card = (out / "README.md").read_text()
    assert "pip install gptqmodel" in card and "GPTQ 4-bit, group size 32" in card
    # The store's scores of the expert, of the 4-bit base it was trained on, and of the float model
    # that base was quantized from, each read from its own evaluation.
    rows = {row["model"]: row for row in info["results"]}
    assert set(rows) == {"expert", "base", "original"}, info["results"]
    for model, scored in (("expert", "expert_eval"), ("base", "quantized_eval"), ("original", "base_eval")):
        metrics = json.loads((found[scored] / "metrics.json").read_text())
        assert (rows[model]["accuracy"], rows[model]["n"]) == (metrics["accuracy"], metrics["n"]), model
    assert "| pubmedqa (test) | the original model (before quantization) |" in card

    namespace = _card_answer(out, monkeypatch)
    model = namespace["model"]
    assert any(type(m).__name__.endswith("Linear") and hasattr(m, "qweight") for m in model.modules())
    test = pd.read_parquet(found["data"] / "test.parquet")
    assert {namespace["answer"](p) for p in test["prompt"].head(3)} <= {"yes", "no", "maybe"}

    # The adapter folder loads by itself from the export, as PEFT's Auto class reads its base.
    from peft import AutoPeftModelForCausalLM

    reloaded = AutoPeftModelForCausalLM.from_pretrained("adapter")
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits.float(), model(ids).logits.float(), rtol=0, atol=0)


@pytest.mark.parametrize("kind, loads", [
    ("gptq", 'from_pretrained(folder / "base", dtype="auto"'),
    ("none", 'from_pretrained(folder / "base", dtype="auto"'),
    ("nf4", 'bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True'),
])
def test_the_card_code_loads_each_kind_of_base_as_it_was_trained_on(kind, loads):
    """NF4 needs bitsandbytes' GPU layers, so its code is checked here, not run: it must parse,
    import what it uses, and quantize as `expert.modeling._nf4_config` does."""
    from expert.export_card import usage_code

    code = usage_code(kind, ["yes", "no"])
    compile(code, "card", "exec")
    assert loads in code and "choices=('yes', 'no',)" in code
    assert ("BitsAndBytesConfig" in code.split("folder = ")[0]) == (kind == "nf4")
    exec("\n".join(line for line in code.splitlines() if line.startswith(("import ", "from "))), {})
    if kind == "nf4":  # the settings the card quantizes with are those training quantized with
        from transformers import BitsAndBytesConfig

        from expert.modeling import _nf4_config

        call = re.search(r"quantization_config=(BitsAndBytesConfig\(.*?\))\)", code, re.S).group(1)
        card = eval(call, {"BitsAndBytesConfig": BitsAndBytesConfig, "torch": torch})
        assert card.to_dict() == _nf4_config(torch.bfloat16).to_dict()


def test_a_merged_gptq_export_computes_what_the_scored_expert_computed(gptq_store, tmp_path, monkeypatch):
    """Folded into the dequantized GPTQ weights: the plain model's logits are those of the base +
    adapter under gptqmodel's torch kernel (float32), and it loads with transformers alone."""
    from transformers import AutoModelForCausalLM

    from expert.cli import main
    from expert.modeling import load_model

    _, found = gptq_store
    out = tmp_path / "merged"
    assert main(["export", str(found["select"]), "--out", str(out), "--merge", "--dtype", "float32"]) == 0
    info = json.loads((out / "expert.json").read_text())
    assert info["merged"] == {"folder": "model", "dtype": "float32"} and not (out / "base").exists()
    config = json.loads((out / "model" / "config.json").read_text())
    assert "quantization_config" not in config

    merged = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)
    assert not any(hasattr(m, "qweight") or hasattr(m, "lora_A") for m in merged.modules())
    expert, _ = load_model(found["quantized"], adapter_dir=found["select"] / "adapter", device="cpu",
                           dtype="float32", gptq_kernel="torch")
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expert(ids).logits, rtol=0, atol=1e-4)
    card = (out / "README.md").read_text()
    assert "folded into the GPTQ base's dequantized weights" in card and "`base/`" not in card, card
    answer = _card_answer(out, monkeypatch)["answer"]
    test = pd.read_parquet(found["data"] / "test.parquet")
    assert {answer(p) for p in test["prompt"].head(2)} <= {"yes", "no", "maybe"}
    assert main(["verify", str(out)]) == 0
    umask = os.umask(0)
    os.umask(umask)
    # As the user's umask makes new files, not save_pretrained's owner-only 0600.
    assert {path.stat().st_mode & 0o777 for path in out.rglob("*.safetensors")} == {0o666 & ~umask}


def test_dtype_without_merge_is_refused(gptq_store, tmp_path, capsys):
    from expert.cli import main

    _, found = gptq_store
    assert main(["export", str(found["select"]), "--out", str(tmp_path / "x"), "--dtype", "bfloat16"]) == 2
    assert "--dtype bfloat16 applies to a merged model: add --merge" in capsys.readouterr().err


def test_an_nf4_base_is_exported_as_the_float_weights_it_quantizes_as_it_loads(tmp_path_factory, tmp_path):
    """quantize.method nf4 keeps no 4-bit weights: the export carries the float ones, says how to
    load them as the adapter was trained (NF4), and --merge folds the adapter into them."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    pytest.importorskip("bitsandbytes")
    _, found = stage_store(tmp_path_factory.mktemp("nf4"), "nf4")
    out = tmp_path / "expert"
    out.mkdir()
    info = export_expert(found["select"], out)
    assert info["base"]["kind"] == "nf4" and (out / "base" / "model.safetensors").is_file()
    assert 'bnb_4bit_quant_type="nf4"' in (out / "README.md").read_text()

    merged_dir = tmp_path / "merged"
    merged_dir.mkdir()
    export_expert(found["select"], merged_dir, merge=True, dtype="float32")
    assert "the float weights the NF4 base was quantized from" in (merged_dir / "README.md").read_text()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir / "model", dtype=torch.float32)
    float_base = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
    unmerged = PeftModel.from_pretrained(float_base, out / "adapter").eval()
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, unmerged(ids).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("stored, asked, merged", [
    ({"dtype": "bfloat16"}, "auto", "bfloat16"), ({"torch_dtype": "float16"}, "auto", "float16"),
    ({}, "auto", "float32"), ({"dtype": "bfloat16"}, "float32", "float32"),
])
def test_a_merge_keeps_the_checkpoints_dtype_unless_told(tmp_path, stored, asked, merged):
    from expert.export_merge import merged_dtype

    (tmp_path / "config.json").write_text(json.dumps(stored))
    assert merged_dtype(asked, tmp_path) == merged


# ---------------------------------------------------------------- --merge, streamed

def _merged_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def _peft_merged(found: dict, kind: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """What PEFT's merge_and_unload makes of the same base and adapter (the way before streaming)."""
    from peft import PeftModel

    from expert.modeling import load_model, resolve_base
    from expert.train.frozen import dense_gptq_layers

    name = str(dtype).removeprefix("torch.")
    if kind == "gptq":
        model, _ = load_model(found["quantized"], training=True, device="cpu", dtype=name)
        dense_gptq_layers(model, dtype)
        # plain layers only now: PEFT merges once the model no longer says it is GPTQ
        model.hf_quantizer, model.quantization_method, model.is_quantized = None, None, False
    else:
        model, _ = load_model(resolve_base(found["quantized"]), device="cpu", dtype=name)
    merged = PeftModel.from_pretrained(model, found["select"] / "adapter").merge_and_unload()
    return {key: value.detach() for key, value in merged.state_dict().items()}


@pytest.mark.parametrize("store", ["plain_store", "gptq_store"])
def test_the_streamed_merge_writes_what_peft_merges_to_the_bit_in_float32(store, request, tmp_path):
    from expert.export_merge import checkpoint_tensors, merge_adapter, model_tensors, read_lora
    from expert.modeling import load_model, model_kind, resolve_base

    _, found = request.getfixturevalue(store)
    kind = model_kind(found["quantized"])
    merge_adapter(found["quantized"], kind, found["select"] / "adapter", tmp_path / "model", "float32")
    ours, peft = _merged_tensors(tmp_path / "model"), _peft_merged(found, kind, torch.float32)
    # The tied lm_head is stored once, as save_pretrained stores it.
    assert set(ours) == set(peft) - {"lm_head.weight"}
    for key in ours:
        assert ours[key].dtype == torch.float32 and torch.equal(ours[key], peft[key]), key
    # Both merged the adapter: the layers it adapts differ from the base's (dequantized) weights.
    layers = read_lora(found["select"] / "adapter")
    if kind == "gptq":
        base_tensors = model_tensors(load_model(found["quantized"], training=True, device="cpu", dtype="float32")[0])
    else:
        base_tensors = checkpoint_tensors(resolve_base(found["quantized"]), layers)
    base = {t.name: t.read().float() for t in base_tensors}
    changed = {key for key in ours if not torch.equal(ours[key], base[key])}
    assert changed == {f"{module}.weight" for module in layers} and len(changed) >= 4, changed
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["dtype"] == "float32" and "quantization_config" not in config
    assert (tmp_path / "model" / "tokenizer.json").is_file()


def test_a_bf16_merge_is_the_float32_merge_rounded_once(plain_store, tmp_path):
    """PEFT rounds the delta to bf16 and then the sum; the stream rounds the float32 sum once."""
    from expert.export_merge import merge_adapter

    _, found = plain_store
    merge_adapter(found["quantized"], "none", found["select"] / "adapter", tmp_path / "f32", "float32")
    merge_adapter(found["quantized"], "none", found["select"] / "adapter", tmp_path / "bf16", "bfloat16")
    exact, rounded = _merged_tensors(tmp_path / "f32"), _merged_tensors(tmp_path / "bf16")
    assert set(exact) == set(rounded)
    for key, value in exact.items():
        assert torch.equal(rounded[key], value.to(torch.bfloat16)), key
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_a_merge_larger_than_a_shard_is_written_in_shards_that_load_as_one(plain_store, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from expert.export_merge import merge_adapter

    _, found = plain_store
    adapter = found["select"] / "adapter"
    merge_adapter(found["quantized"], "none", adapter, tmp_path / "one", "float32")
    merge_adapter(found["quantized"], "none", adapter, tmp_path / "many", "float32", shard_bytes=100_000)
    shards = sorted((tmp_path / "many").glob("*.safetensors"))
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and {p.name for p in shards} == set(index["weight_map"].values())
    assert shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    for path in shards:  # over the limit only where one tensor alone is
        assert path.stat().st_size <= 100_000 + 1024 or len(load_file(path)) == 1, path
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in _merged_tensors(tmp_path / "many").values())
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.no_grad():
        one = AutoModelForCausalLM.from_pretrained(tmp_path / "one", dtype=torch.float32)(ids).logits
        many = AutoModelForCausalLM.from_pretrained(tmp_path / "many", dtype=torch.float32)(ids).logits
    assert torch.equal(one, many)


def test_a_checkpoint_under_names_transformers_maps_is_merged_from_the_loaded_model(plain_store, tmp_path):
    """A base stored without the 'model.' prefix (a LlamaModel checkpoint, which transformers loads
    into the causal LM): the adapter's layers are not found by name in the files, so the merge
    takes the tensors from the loaded model instead, with the same result."""
    from safetensors.torch import load_file, save_file

    from expert.export_merge import checkpoint_tensors, merge_adapter, read_lora
    from expert.modeling import resolve_base

    _, found = plain_store
    source, adapter = resolve_base(found["quantized"]), found["select"] / "adapter"
    bare = tmp_path / "bare"
    shutil.copytree(source, bare, ignore=shutil.ignore_patterns("*.safetensors", "manifest.json"))
    save_file({k.removeprefix("model."): v for k, v in load_file(source / "model.safetensors").items()},
              bare / "model.safetensors", metadata={"format": "pt"})
    assert checkpoint_tensors(bare, read_lora(adapter)) is None
    merge_adapter(bare, "none", adapter, tmp_path / "mapped", "float32")
    merge_adapter(found["quantized"], "none", adapter, tmp_path / "direct", "float32")
    mapped, direct = _merged_tensors(tmp_path / "mapped"), _merged_tensors(tmp_path / "direct")
    assert set(mapped) == set(direct) and all(torch.equal(mapped[k], direct[k]) for k in direct)


def _edited_adapter(found: dict, tmp_path: Path, config: dict | None = None, weights=None) -> Path:
    from safetensors.torch import load_file, save_file

    adapter = tmp_path / "adapter"
    shutil.copytree(found["select"] / "adapter", adapter)
    if config:
        path = adapter / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    if weights:
        tensors = weights(load_file(adapter / "adapter_model.safetensors"))
        save_file(tensors, adapter / "adapter_model.safetensors")
    return adapter


@pytest.mark.parametrize("config, weights, message", [
    ({"use_dora": True}, None, "sets use_dora to True, which --merge cannot fold"),
    ({"alpha_pattern": {"q_proj": 4}}, None, "sets alpha_pattern"),
    ({"peft_type": "IA3"}, None, "holds a IA3 adapter"),
    (None, lambda t: {**t, "base_model.model.lm_head.modules_to_save.weight": torch.zeros(2)}, "no LoRA A or B"),
    (None, lambda t: {k: v for k, v in t.items() if not k.endswith("q_proj.lora_B.weight")}, "but not its pair"),
    (None, lambda t: {k: torch.zeros(v.shape[0], v.shape[1] + 1) if k.endswith("q_proj.lora_A.weight") else v
                      for k, v in t.items()}, "the adapter was trained on another model"),
    (None, lambda t: {k.replace("layers.0.", "layers.9."): v for k, v in t.items()}, "has no weight"),
])
def test_what_merge_cannot_fold_is_refused_by_name(plain_store, tmp_path, config, weights, message):
    from expert.export_merge import merge_adapter

    _, found = plain_store
    adapter = _edited_adapter(found, tmp_path, config, weights)
    with pytest.raises(ExpertError, match=re.escape(message)):
        merge_adapter(found["quantized"], "none", adapter, tmp_path / "model", "float32")


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o027])
def test_the_umask_is_read_as_set(mask, monkeypatch):
    from expert import export

    before = os.umask(mask)
    try:
        assert export._umask() == mask
        # Where /proc says nothing, it is read by setting it for an instant, and put back.
        monkeypatch.setattr(export.Path, "read_text", lambda self, *a, **k: "")
        assert export._umask() == mask and os.umask(mask) == mask
    finally:
        os.umask(before)


def test_gptq_layers_that_do_more_than_dequantize_and_multiply_are_refused_by_name(gptq_store):
    from expert.export_merge import model_tensors
    from expert.modeling import load_model

    _, found = gptq_store
    model, _ = load_model(found["quantized"], training=True, device="cpu", dtype="float32")
    assert len(model_tensors(model)) > 0
    name, layer = next((n, m) for n, m in model.named_modules() if hasattr(m, "qweight"))
    layer.adapter = object()  # an EoRA adapter around its matmul: no plain weight holds what it computes
    with pytest.raises(ExpertError, match=re.escape(f"the GPTQ layers ['{name}'] do more than dequantize")):
        model_tensors(model)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_peft_adapter_beyond_what_training_makes_merges_as_peft_merges_it(family, tmp_path):
    """rsLoRA, a rank per layer (rank_pattern) and GPT-2's Conv1D layers, stored [in, out]
    (PEFT sets fan_in_fan_out): the stream writes the bits PEFT's merge_and_unload gives."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from expert.export_merge import merge_adapter
    from tests.fixtures.models import tiny_llama_dir

    if family == "llama":
        base = tiny_llama_dir(tmp_path / "base")
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                          rank_pattern={"v_proj": 2}, init_lora_weights=False)
    else:
        base = tmp_path / "base"
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                   bos_token_id=0, eos_token_id=0)).save_pretrained(base)
        lora = LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                          init_lora_weights=False)
    torch.manual_seed(1)
    get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), lora).save_pretrained(
        tmp_path / "adapter")

    merge_adapter(base, "plain", tmp_path / "adapter", tmp_path / "merged", "float32")
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                     tmp_path / "adapter").merge_and_unload().state_dict()
    ours = _merged_tensors(tmp_path / "merged")
    base_tensors = _merged_tensors(base)
    assert set(ours) == set(base_tensors)  # what the base stores, no more (a tied head stays tied)
    changed = [key for key in ours if not torch.equal(ours[key], base_tensors[key])]
    assert len(changed) == 6, changed  # 3 modules in each of 2 layers (GPT-2: two c_proj per layer)
    for key, value in ours.items():
        assert torch.equal(value, peft[key]), key
