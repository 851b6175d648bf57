"""Record-only quantization: `nf4` (bitsandbytes 4-bit at load time) and `none` (the base as is).

bitsandbytes quantizes while loading, in well under a minute even for a 33B model, so storing
quantized weights would buy nothing: the stage writes `quantization.json` with the settings and
the base model's folder relative to the output folder, and `expert.modeling.load_model` does the
rest. A relative path keeps the artifact store movable as a whole.

    write_record(QuantizeConfig(method="nf4"), base_dir, out_dir)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from expert.modeling import RECORD_FILE
from expert.quantize.config import QuantizeConfig

# What modeling._nf4_config loads with; recorded so the artifact says what it stands for.
NF4_SETTINGS = {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "auto"}


def record_for(config: QuantizeConfig, base_dir: Path, out_dir: Path) -> dict[str, Any]:
    """The `quantization.json` content for method nf4 or none."""
    settings = NF4_SETTINGS if config.method == "nf4" else {}
    base = os.path.relpath(Path(base_dir).resolve(), Path(out_dir).resolve())
    return {"method": config.method, **settings, "base_model": base}


def write_record(config: QuantizeConfig, base_dir: Path, out_dir: Path) -> dict[str, Any]:
    record = record_for(config, base_dir, out_dir)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record
