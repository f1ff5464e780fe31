"""Markdown table cells from names and values that users choose (class folders, run and member
names, sweep settings): a `|` inside a cell would split it, a newline would end the table."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable


def cell(text) -> str:
  """`text` as one table cell: `|` escaped, line breaks as spaces."""
  return " ".join(str(text).replace("\\", "\\\\").replace("|", "\\|").splitlines())


def row(cells: Iterable) -> str:
  """'| a | b |', every cell through `cell`."""
  return "| " + " | ".join(cell(c) for c in cells) + " |"


def fraction(v) -> float:
  """A metric read from a results file as a float; NaN (shown as '-') for anything that is
  not a finite number (a string, a bool, inf, a list), so a damaged or hand-edited file never
  prints 'inf' or stops a report with a ValueError."""
  if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
    return math.nan
  return float(v)
