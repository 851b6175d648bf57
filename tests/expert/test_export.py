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
