"""CSV cells are never evaluated as spreadsheet formulas; numbers and real names survive."""

import csv
import io
import os
import re

import numpy as np
import pytest

from cras_jax.base import csv_cells
from cras_jax.method import metrics
from cras_jax.results import tables as results

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize(
    "text",
    ['=HYPERLINK("http://x")', "+1+1", "-2+3", "@SUM(A1)", "\tx", "\rx", "-cmd|' /C calc'!A0"],
)
def test_formula_text_is_prefixed(text):
  assert csv_cells.safe_cell(text) == "'" + text


@pytest.mark.parametrize(
    "value", ["-0.25", "+3", "1e-05", "-1.5E+07", "nan", "-inf", "plain.png", "a=b", ""]
)
def test_numbers_and_plain_text_are_kept(value):
  assert csv_cells.safe_cell(value) == value


def test_non_strings_are_kept():
  assert csv_cells.safe_cell(-3) == -3 and csv_cells.safe_cell(None) is None


def test_written_rows_round_trip_with_prefix():
  buf = io.StringIO()
  csv_cells.writer(buf).writerow(["=1+1", "-0.5", "bottle"])
  assert next(csv.reader(io.StringIO(buf.getvalue()))) == ["'=1+1", "-0.5", "bottle"]


def test_scores_csv_neutralises_image_and_class_names(tmp_path):
  res = {
      "name": ["=cmd|x.png", "ok.png"],
      "label": np.array([0, 1]),
      "cls": np.array([1, 0]),
      "is_anomaly": np.array([0, 1]),
      "scores": np.array([-0.5, 0.25]),
  }
  path = tmp_path / "scores.csv"
  results.write_scores(res, ["@class", "+b"], str(path))
  rows = list(csv.reader(open(path)))
  assert rows[1] == ["'=cmd|x.png", "'@class", "'+b", "0", "-0.500000"]
  assert rows[2][:3] == ["ok.png", "'+b", "'@class"]


def test_metrics_csv_neutralises_class_names(tmp_path):
  table = {"=evil": {"i_auroc": 0.5}, "mean": {"i_auroc": 0.5}}
  path = tmp_path / "m.csv"
  metrics.to_csv(table, str(path))
  assert [r[0] for r in csv.reader(open(path))][1:] == ["'=evil", "mean"]


def test_every_csv_writer_goes_through_safe_cells():
  """No module writes CSV with the plain csv.writer / DictWriter."""
  offenders = []
  for dirpath, _, files in os.walk(os.path.join(ROOT, "cras_jax")):
    for f in files:
      if f.endswith(".py") and f != "csv_cells.py":
        text = open(os.path.join(dirpath, f), encoding="utf-8").read()
        if re.search(r"\bcsv\.(writer|DictWriter)\(", text):
          offenders.append(f)
  assert offenders == []
