"""The one way stored results (metrics, plot data, loss curves) are written as JSON.

Floats are rounded to `SIGNIFICANT_DIGITS` significant digits: the precision the results
carry. A rerun on another machine computes the CLIP states with float differences of about
1e-8 (other CPU kernels); rounding keeps those out of the stored numbers wherever they stay
below the last kept digit, so they do not show up as changed files in git (see README,
"Reruns on another machine"). Keys keep the order the code builds them in (deterministic),
the file ends with a newline and is replaced atomically, so a killed stage never leaves a
half-written metrics file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pipeline.core.atomic import atomic_path

SIGNIFICANT_DIGITS = 6


def round_floats(data: Any, digits: int = SIGNIFICANT_DIGITS) -> Any:
    """`data` with every finite float rounded to `digits` significant digits (ints, bools,
    strings, NaN and infinities unchanged); dicts, lists and tuples are copied."""
    if isinstance(data, float):  # numpy float64 included; bool is not a float
        return float(f"{data:.{digits}g}") if math.isfinite(data) else data
    if isinstance(data, dict):
        return {key: round_floats(value, digits) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [round_floats(value, digits) for value in data]
    return data


def dumps(data: Any, indent: int = 2) -> str:
    """The text `write_json` stores: rounded floats, `indent`, a trailing newline."""
    return json.dumps(round_floats(data), indent=indent) + "\n"


def write_json(path: Path, data: Any, indent: int = 2) -> None:
    """Write `data` to `path` (parents created) atomically: a temporary file in the same
    folder, renamed over `path` when complete."""
    with atomic_path(path) as tmp:
        tmp.write_text(dumps(data, indent), encoding="utf-8")
