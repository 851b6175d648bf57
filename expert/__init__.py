"""EXPERT: turn an open LLM into a task expert on one GPU (GPTQ 4-bit + LoRA).

`expert` is the plain library behind the Prefect flow: no Prefect import anywhere in
this package (a test checks it), so every stage can run from a notebook or a script.
"""

__version__ = "0.1.0"
