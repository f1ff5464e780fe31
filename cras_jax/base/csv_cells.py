"""CSV cells that a spreadsheet shows as text, never evaluates.

A cell starting with `=`, `+`, `-`, `@`, a tab or a carriage return is read by spreadsheet
programs as a formula (an image named `=HYPERLINK(...).png` would run when results.csv is
opened). `safe_cell` prefixes such text with `'`, which spreadsheets show as text; numbers
(also written as text, e.g. `-0.25`, `1e-05`, `nan`, `-inf`) are left as they are. Every CSV
the project writes goes through `writer`; the JSON files keep the real names.
"""

from __future__ import annotations

import csv
import re
from typing import Any

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(nan|inf|infinity)", re.I)


def safe_cell(value: Any) -> Any:
  """`value` with text that a spreadsheet would evaluate prefixed by `'` (numbers kept)."""
  if not isinstance(value, str) or not value.startswith(FORMULA_STARTS):
    return value
  if _NUMBER.fullmatch(value):
    return value
  return "'" + value


class SafeWriter:
  """`csv.writer` whose rows go through `safe_cell`."""

  def __init__(self, f, **kwargs):
    self._w = csv.writer(f, **kwargs)

  def writerow(self, row):
    return self._w.writerow([safe_cell(v) for v in row])

  def writerows(self, rows):
    for row in rows:
      self.writerow(row)


def writer(f, **kwargs) -> SafeWriter:
  return SafeWriter(f, **kwargs)
