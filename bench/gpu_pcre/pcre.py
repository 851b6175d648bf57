"""Stand-in for pypcre on the GPU bench machine only (see bench/gpu.py, `_gptq_child`).

gptqmodel imports `pcre` (pypcre, a PCRE2 binding) to match module names with simple
patterns. pypcre ships no wheel for the GPU image's Python 3.12 and its source build needs
cmake, which that offline machine lacks; these patterns mean the same under Python's `re`.
Never on the path of the project itself.
"""

import enum
import re
from re import Match, Pattern, error as PcreError, escape, split  # noqa: F401 - the names gptqmodel uses


class Flag(enum.IntFlag):
    CASELESS = re.IGNORECASE
    MULTILINE = re.MULTILINE
    DOTALL = re.DOTALL


def compile(pattern, flags=0):  # noqa: A001 - pypcre's name
    return re.compile(pattern, int(flags))
