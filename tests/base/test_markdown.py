"""Markdown tables from names users choose and values read from files: a `|` in a class, run or
member name stays inside its cell; a value that is not a finite number shows as '-'."""

import math

import numpy as np
import pytest

from cras_jax.base import markdown
from cras_jax.experiments import report, spread
from cras_jax.method import metrics


def _cells(line: str) -> list[str]:
  """A table line's cells, split only at unescaped '|'."""
  out, cur, i = [], "", 1
  body = line.strip()
  while i < len(body) - 1:
    if body[i] == "\\":
      cur += body[i : i + 2]
      i += 2
      continue
    if body[i] == "|":
      out.append(cur.strip())
      cur = ""
    else:
      cur += body[i]
    i += 1
  return [*out, cur.strip()]


def test_a_cell_keeps_pipes_and_line_breaks_inside():
  assert markdown.row(["a|b", "c\nd", 3]) == "| a\\|b | c d | 3 |"
  assert _cells(markdown.row(["a|b", "x\\|y"])) == ["a\\|b", "x\\\\\\|y"]


@pytest.mark.parametrize(
    "v,want",
    [
        (0.5, 0.5),
        (np.float32(0.25), 0.25),
        (1, 1.0),
        ("0.9", None),
        (math.inf, None),
        (True, None),
        (None, None),
        ([0.5], None),
        (math.nan, None),
    ],
)
def test_only_finite_numbers_are_metric_values(v, want):
  got = markdown.fraction(v)
  assert math.isnan(got) if want is None else got == want


def _run(name, **values):
  return {"name": name, "protocol": "final epoch", "metrics": {"a|b": values, "mean": values}}


def test_report_tables_keep_one_cell_per_name_and_show_dashes_for_bad_values():
  runs = [_run("wo|hpi", i_auroc=0.9, p_auroc=math.inf), _run("full", i_auroc="x", p_auroc=0.8)]
  summary = report.summary_markdown(runs, ("i_auroc", "p_auroc"))
  rows = [l for l in summary.splitlines() if l.startswith("| wo") or l.startswith("| full")]
  assert [_cells(r) for r in rows] == [
      ["wo\\|hpi", "final epoch", "90.0", "-"],
      ["full", "final epoch", "-", "80.0"],
  ]
  per_class = report.per_class_markdown(runs)
  lines = per_class.splitlines()
  header = next(l for l in lines if l.startswith("| class"))
  assert _cells(header) == ["class", "wo\\|hpi", "full"]
  assert _cells(next(l for l in lines if l.startswith("| a"))) == ["a\\|b", "90.0/-", "-/80.0"]
  assert "inf" not in summary + per_class


def test_metrics_and_spread_tables_escape_class_names():
  table = {"a|b": {"i_auroc": 0.9}, "mean": {"i_auroc": 0.9}}
  line = next(l for l in metrics.to_markdown(table).splitlines() if l.startswith("| a"))
  assert _cells(line) == ["a\\|b", "90.0"]
  sp = spread.spread([table, table], ["i_auroc"])
  line = next(
      l for l in spread.markdown(sp, ["i_auroc"], {}, 2).splitlines() if l.startswith("| a")
  )
  assert _cells(line)[0] == "a\\|b" and len(_cells(line)) == 3
