"""The quantize stage: the imported base model -> a 4-bit model folder + a quantization report.

    summary = quantize(QuantizeConfig(), Path("artifacts/model/<key>"),
                       Path("artifacts/data/<key>"), Path("out"))

method "gptq" writes a GPTQ Hugging Face folder (safetensors, config.json with
quantization_config, tokenizer; quantized with gptqmodel's own API, see `gptq.py`); "nf4" and
"none" write only `quantization.json`, which `expert.modeling.load_model` follows to the base.
Every method writes `quantization_report.json` and `.md` (GPTQ also `.png`, its layers' errors
by depth, `plots.py`). The run lives in `run.py`. Steps, in the order that keeps at most one
full-precision model in memory at a time:
check the group size and read the calibration set (no weights read, so bad settings fail in
seconds) -> perplexity of the unquantized model on dev texts, then free it -> GPTQ (loads and
quantizes in place) -> save, free -> reload the saved folder as every later stage will, and
measure its perplexity and per-layer error (beside gptqmodel's own per-module GPTQ loss).
Given a work folder, GPTQ commits each layer there where gptqmodel can, and a rerun after a crash
continues after the last one (`checkpoint.py`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from expert.quantize.config import QuantizeConfig

__all__ = ["QuantizeConfig", "quantize"]


def quantize(config: QuantizeConfig, model_dir: Path, data_dir: Path | None, out_dir: Path,
             progress: Callable[[int, int], None] | None = None, work_dir: Path | None = None) -> dict[str, Any]:
    """Run the stage into `out_dir`; return the report's summary (small, JSON-ready).
    `work_dir` keeps GPTQ's layer checkpoints through a crash (see run.py)."""
    # The run needs torch, transformers and gptqmodel (seconds to import); reading a config
    # (every `expert run`, every cached rerun) needs none of them, so they load on first use.
    from expert.quantize.run import quantize as run_stage

    return run_stage(config, model_dir, data_dir, out_dir, progress, work_dir)
