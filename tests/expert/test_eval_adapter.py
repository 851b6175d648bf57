"""Scoring through a PEFT LoRA adapter: zero B matrices change nothing, non-zero ones do."""

import pytest
import torch

from expert.errors import ModelError
from expert.evaluation.loading import load_model
from expert.evaluation.scoring import encode_questions, score_questions
from tests.expert.eval_fixtures import llama_dir, loaded, mmlu_frame, pubmedqa_frame  # noqa: F401


def save_adapter(llama_dir, path, b_value: float | None):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(llama_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    if b_value is not None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.fill_(b_value)
    assert all(bool((p == 0).all()) == (not b_value) for n, p in model.named_parameters() if "lora_B" in n)
    model.save_pretrained(path)
    return path


def scores(model, tokenizer):
    prompts = pubmedqa_frame()["prompt"].tolist()[:3]
    questions = encode_questions(tokenizer, prompts, [[" yes", " no", " maybe"]] * len(prompts))
    return score_questions(model, questions, max_length=256, batch_size=2)


def test_zero_lora_changes_nothing_nonzero_lora_changes_scores(llama_dir, loaded, tmp_path):
    base = scores(loaded.model, loaded.tokenizer)
    zero = load_model(llama_dir, save_adapter(llama_dir, tmp_path / "zero", None), device="cpu",
                      dtype="float32")
    assert type(zero.model).__name__.startswith("Peft")
    assert scores(zero.model, zero.tokenizer) == [pytest.approx(row, abs=1e-5) for row in base]
    trained = load_model(llama_dir, save_adapter(llama_dir, tmp_path / "trained", 0.05), device="cpu",
                         dtype="float32")
    changed = scores(trained.model, trained.tokenizer)
    assert max(abs(a - b) for r, s in zip(changed, base) for a, b in zip(r, s)) > 1e-3


def test_prefix_cache_through_an_adapter_equals_uncached(llama_dir, tmp_path):
    trained = load_model(llama_dir, save_adapter(llama_dir, tmp_path / "trained", 0.05), device="cpu",
                         dtype="float32")
    frame = mmlu_frame(3)
    questions = encode_questions(trained.tokenizer, frame["prompt"].tolist(), [[" A", " B", " C", " D"]] * len(frame))
    groups = list(frame.groupby("subject", sort=False).indices.values())
    plain = score_questions(trained.model, questions, max_length=256, batch_size=2)
    cached = score_questions(trained.model, questions, max_length=256, batch_size=2, groups=groups)
    assert cached == [pytest.approx(row, abs=1e-4) for row in plain]


def test_the_output_head_gets_a_contiguous_input_under_an_adapter(llama_dir, tmp_path):
    # A strided input with a frozen weight sends torch.matmul down its batched path, which in bf16
    # on a CPU copies the vocabulary matrix per row (see loading.contiguous_head_input).
    trained = load_model(llama_dir, save_adapter(llama_dir, tmp_path / "trained", 0.05), device="cpu",
                         dtype="float32")
    head = trained.model.get_output_embeddings()
    assert not head.weight.requires_grad
    seen = []
    head.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.inference_mode():
        kept = trained.model(input_ids=ids, logits_to_keep=1).logits
        full = trained.model(input_ids=ids).logits
    assert seen == [True, True]
    torch.testing.assert_close(kept[:, 0], full[:, -1])


def test_missing_adapter_and_model_files_are_named(llama_dir, tmp_path):
    with pytest.raises(ModelError, match="adapter_config.json"):
        load_model(llama_dir, tmp_path, device="cpu")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="a tokenizer .*weights"):
        load_model(tmp_path, device="cpu")
