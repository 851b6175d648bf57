"""The README.md of an exported expert: what it is, how it scored, and code that loads and asks it.

The code block is the one a user copies; tests run it on an export and compare its answers
with EXPERT's own scoring of the same questions.
"""

from __future__ import annotations

from typing import Any

# How each kind of base loads with transformers alone; NF4 is quantized as EXPERT trained on it
# (expert.modeling._nf4_config).
_LOADS = {
    "gptq": 'model = AutoModelForCausalLM.from_pretrained(folder / "base", dtype="auto", device_map="auto")',
    "nf4": ('model = AutoModelForCausalLM.from_pretrained(folder / "base", device_map="auto", quantization_config='
            'BitsAndBytesConfig(\n    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,\n'
            '    bnb_4bit_compute_dtype=torch.bfloat16))'),
}
_PLAIN_LOAD = 'model = AutoModelForCausalLM.from_pretrained(folder / "base", dtype="auto", device_map="auto")'
_MERGED = {
    "gptq": ("A plain transformers model in {dtype}: the adapter folded into the GPTQ base's dequantized weights, so "
             "it computes what the scored expert computed, up to the rounding of the merged weights to {dtype}."),
    "nf4": ("A plain transformers model in {dtype}: the adapter folded into the float weights the NF4 base was "
            "quantized from (QLoRA's usual merge); it differs from the scored expert by NF4's rounding."),
    "none": "A plain transformers model in {dtype}: the adapter folded into the base's weights.",
    "plain": "A plain transformers model in {dtype}: the adapter folded into the base's weights.",
}
_NEEDS = {
    "gptq": "The base is GPTQ 4-bit: transformers loads it through gptqmodel (`pip install gptqmodel`).",
    "nf4": ("The adapter was trained on the base quantized to NF4 as it loads: the code loads it the same way, "
            "which needs bitsandbytes and, for its 4-bit layers, a GPU."),
}


def model_card(info: dict[str, Any]) -> str:
    base, adapter, prompt = info["base"], info["adapter"], info["prompt"]
    model = base.get("source") or base.get("architecture") or "a model"
    title = info.get("name") or f"{model} for {prompt['benchmark']}"
    lines = [f"# {title}: an expert made by EXPERT", ""]
    lines += _what(info) + [""]
    if info["results"]:
        lines += _results(info["results"]) + [""]
    merged = info.get("merged")
    needs = _MERGED[base["kind"]].format(dtype=merged["dtype"]) if merged else \
        _NEEDS.get(base["kind"], "The base is a plain transformers model.")
    lines += ["## Use it", "", needs,
              "The expert answers by scoring each choice after the prompt, as EXPERT and lm-evaluation-harness "
              "score it: the answer is the choice whose tokens are the most likely continuation.", "",
              "```python", usage_code(base["kind"], prompt["choices"], merged=bool(merged)), "```", ""]
    lines += _prompt(prompt)
    files = ["- `model/`: the merged model (base + adapter), with its tokenizer"] if merged else [
        "- `base/`: the base model the adapter was trained on",
        "- `adapter/`: the LoRA adapter (PEFT); `base_model_name_or_path` is `base`, this folder's sibling, so "
        "`AutoPeftModelForCausalLM.from_pretrained(\"adapter\")` works from this folder"]
    lines += ["", "## Files", "", *files,
              "- `expert.json`: these facts for programs; `manifest.json`: every file's size and sha256 "
              "(`expert verify .` checks them)", ""]
    return "\n".join(lines)


def usage_code(kind: str, choices: list[str], merged: bool = False) -> str:
    if merged:
        loading = '''from transformers import AutoModelForCausalLM, AutoTokenizer

folder = Path(".")  # this folder
tokenizer = AutoTokenizer.from_pretrained(folder / "model")
model = AutoModelForCausalLM.from_pretrained(folder / "model", dtype="auto", device_map="auto").eval()
'''
    else:
        imports = "from transformers import AutoModelForCausalLM, AutoTokenizer"
        if kind == "nf4":
            imports = "from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig"
        loading = f'''from peft import PeftModel
{imports}

folder = Path(".")  # this folder
tokenizer = AutoTokenizer.from_pretrained(folder / "base")
{_LOADS.get(kind, _PLAIN_LOAD)}
model = PeftModel.from_pretrained(model, folder / "adapter").eval()
'''
    return f'''from pathlib import Path

import torch
{loading.rstrip()}


def answer(prompt: str, choices=({", ".join(repr(c) for c in choices)},)) -> str:
    context = prompt.rstrip()
    start = len(tokenizer(context).input_ids)
    scores = []
    for choice in choices:
        ids = tokenizer(context + prompt[len(context):] + " " + choice).input_ids
        with torch.no_grad():
            logits = model(torch.tensor([ids], device=model.device)).logits[0].float()
        logprobs = logits.log_softmax(-1)
        scores.append(sum(logprobs[i - 1, ids[i]].item() for i in range(start, len(ids))))
    return choices[scores.index(max(scores))]'''


def _what(info: dict[str, Any]) -> list[str]:
    base, adapter, training = info["base"], info["adapter"], info["training"]
    quant = base.get("quantization") or {}
    kind = {"gptq": f"GPTQ {quant.get('bits', 4)}-bit, group size {quant.get('group_size')}",
            "nf4": "NF4 4-bit (bitsandbytes, quantized as it loads)"}.get(base["kind"], "not quantized")
    lora = adapter["lora"]
    targets = ", ".join(lora["target_modules"]) if isinstance(lora["target_modules"], list) else lora["target_modules"]
    size = f", {_count(base['n_params'])} parameters" if base.get("n_params") else ""
    where = f"`{base['folder']}/`; " if base.get("folder") else ""  # none: merged into model/
    lines = [f"- Base: `{base.get('source') or base.get('architecture')}`{size}, {kind} ({where}artifact "
             f"`{base['artifact']}`)",
             f"- Adapter: LoRA r {lora['r']}, alpha {lora['lora_alpha']}, dropout {lora['lora_dropout']}, on "
             f"{targets}" + (f" (`{adapter['folder']}/`)" if adapter.get("folder") else "")]
    if training.get("steps") is not None:
        epochs = training.get("epochs")
        lines.append(f"- Trained {training['steps']} optimizer steps ({epochs:.2f} epochs) on "
                     f"{training.get('examples')} examples, {training.get('precision')} on {training.get('device')}"
                     if epochs is not None else f"- Trained {training['steps']} optimizer steps")
    if adapter.get("step") is not None:
        lines.append(f"- Chosen: the checkpoint of step {adapter['step']}, the best {adapter.get('selected_by')} "
                     f"({_number(adapter.get('dev_score'))}) of {adapter.get('checkpoints_scored')} on "
                     f"{adapter.get('dev_questions')} held-out dev questions")
    return lines


_ROWS = {"expert": "the expert", "base": "the base it was trained on, alone",
         "original": "the original model (before quantization)"}


def _results(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["## Results", "", "| benchmark | model | n | accuracy (%) | macro-F1 (%) |", "|---|---|---|---|---|"]
    for row in rows:
        accuracy = row.get("accuracy", row.get("average"))
        lines.append(f"| {row['benchmark']} ({row['split']}) | {_ROWS[row['model']]} "
                     f"| {row['n']} | {_percent(accuracy)} | {_percent(row.get('macro_f1'))} |")
    lines += ["", "Scored by EXPERT's evaluate stage on the store this was exported from (MMLU: the average "
              "over questions, 5-shot)."]
    return lines


def _prompt(prompt: dict[str, Any]) -> list[str]:
    lines = ["## Prompt", ""]
    if prompt.get("template"):
        lines += [f"The `{prompt['template_name']}` template; `{{contexts}}` is the abstract's sections joined "
                  "by newlines:", "", "```text", prompt["template"], "```", ""]
    choices = ", ".join(f'"{c}"' for c in prompt["choices"])
    lines.append(f"Choices: {choices}, each scored as a space and the word after the prompt.")
    example = prompt.get("example")
    if example:
        lines += ["", f"A dev question as it was scored (answer: {example['answer']}):", "", "```text",
                  example["prompt"], "```"]
    return lines


def _count(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:,.0f}M" if n >= 1e6 else f"{n:,}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
