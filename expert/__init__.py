"""EXPERT: turn an open LLM into a task expert on one GPU (GPTQ 4-bit + LoRA).

`expert` is the plain library behind the Prefect flow: no Prefect import anywhere in
this package (a test checks it), so every stage can run from a notebook or a script.
"""

__version__ = "0.1.0"

import logging as _logging


class _ImportNoise(_logging.Filter):
    """Drops two warnings that importing PEFT prints on every run and that say nothing about
    this run: torchao (a gptqmodel dependency, which PEFT imports when present; EXPERT calls none
    of it) cannot load its CUDA kernels on a CPU build or its extension built for another Python,
    and registers Enum pytree constants that torch 2.13 deprecates. Every other warning of both
    loggers still shows."""

    def filter(self, record: _logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.name == "torchao":
            return not (message.startswith("Failed to load ") and ".so:" in message)
        return "is an Enum subclass and is now natively supported by torch.compile" not in message


for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).addFilter(_ImportNoise())
