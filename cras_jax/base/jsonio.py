"""JSON the strict parsers accept: non-finite floats written as null."""

from __future__ import annotations

import math

import numpy as np


def json_safe(x):
  """`x` with every non-finite float as None (JSON null) and numpy floats as Python floats:
  strict JSON parsers reject NaN and `json` rejects numpy scalars."""
  if isinstance(x, dict):
    return {k: json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [json_safe(v) for v in x]
  if isinstance(x, (float, np.floating)):
    return float(x) if math.isfinite(x) else None
  return x
