"""EXPERT: turn an open LLM into a task expert on one GPU (GPTQ 4-bit + LoRA).

`expert` is the plain library behind the Prefect flow: no Prefect import anywhere in
this package (a test checks it), so every stage can run from a notebook or a script.
"""

__version__ = "0.1.0"

import logging as _logging


class _ImportNoise(_logging.Filter):
    """Drops three warnings that importing PEFT prints on every run and that say nothing about
    this run: torchao (a gptqmodel dependency, which PEFT imports when present; EXPERT calls none
    of it) cannot load its CUDA kernels on a CPU build or its extension built for another Python,
    finds no Triton for its int8 matmuls on a CPU build, and registers Enum pytree constants that
    torch 2.13 deprecates. Every other warning of these loggers still shows. (A logger's filter
    sees only its own records, not its children's: each logger is named.)"""

    def filter(self, record: _logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.name == "torchao":
            return not (message.startswith("Failed to load ") and ".so:" in message)
        if record.name == "torchao.kernel.intmm":
            return "Detected no triton" not in message
        return "is an Enum subclass and is now natively supported by torch.compile" not in message


for _name in ("torchao", "torchao.kernel.intmm", "torch.utils._pytree"):
    _logging.getLogger(_name).addFilter(_ImportNoise())
