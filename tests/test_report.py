"""The report's spread over seeds: a population run's members and a sweep's seeded runs
grouped into settings, mean ± std and the paired test against the first setting."""

import json
import os

import numpy as np
import pytest
from scipy import stats

from cras_jax import report


def write(path, metrics, **extra):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "metrics_final.json"), "w") as f:
    json.dump({"metrics": metrics, "protocol": "final epoch", "step": 6, **extra}, f)


def table(values):
  t = {c: {"i_auroc": v, "p_auroc": v} for c, v in zip(("a", "b", "c"), values)}
  t["mean"] = {m: float(np.mean(values)) for m in ("i_auroc", "p_auroc")}
  return t


def test_spread_of_a_population_and_of_seeded_runs(tmp_path):
  sw = tmp_path / "sw"
  pop = [[0.90, 0.80, 0.85], [0.92, 0.82, 0.83], [0.88, 0.79, 0.86]]
  members = ["seed0", "seed1", "seed2"]
  for m, v in zip(members, pop):
    write(sw / "full" / "results" / m, table(v))
  write(sw / "full" / "results", table(np.mean(pop, 0)), population="seed=0,1,2", members=members)
  worse = [[v - 0.1 for v in row] for row in pop]
  for s, v in enumerate(worse):
    write(sw / f"wo_x_seed{s}" / "results", table(v))
    with open(sw / f"wo_x_seed{s}" / "sweep_run.json", "w") as f:
      json.dump({"group": "wo_x", "run_overrides": []}, f)
  with open(sw / "sweep.json", "w") as f:
    json.dump({"runs": ["full", "wo_x_seed0", "wo_x_seed1", "wo_x_seed2"]}, f)
  out = report.report([str(sw)], metrics="i_auroc,p_auroc")
  md = out["spread_md"]
  want = 100 * np.mean([np.mean(v) for v in pop]), 100 * np.std([np.mean(v) for v in pop], ddof=1)
  assert f"| full | 3 | {want[0]:.1f} ± {want[1]:.1f}" in md
  assert "| wo_x | 3 |" in md
  p = stats.wilcoxon(np.ravel(worse), np.ravel(pop)).pvalue
  assert f"| wo_x | -10.0 (p={p:.2g})*" in md
  assert os.path.exists(sw / "report" / "spread_final.csv")


def test_no_spread_table_for_single_seeds(tmp_path):
  write(tmp_path / "sw" / "a" / "results", table([0.9, 0.8, 0.7]))
  assert report.report([str(tmp_path / "sw")])["spread_md"] is None
  with pytest.raises(report.ReportError):
    report.report([str(tmp_path / "missing")])
