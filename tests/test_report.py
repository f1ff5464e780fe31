"""The report's spread over seeds: a population run's members and a sweep's seeded runs
grouped into settings, mean ± std and the paired test against the first setting."""

import json
import os

import numpy as np
import pytest
from scipy import stats

from cras_jax.experiments import report


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
  assert "Variance sources (what the seeds vary): not recorded" in md  # no configs written
  p = stats.wilcoxon(np.ravel(worse), np.ravel(pop)).pvalue
  assert f"| wo_x | -10.0 (p={p:.2g})*" in md
  assert os.path.exists(sw / "report" / "spread_final.csv")


def test_no_spread_table_for_single_seeds(tmp_path):
  write(tmp_path / "sw" / "a" / "results", table([0.9, 0.8, 0.7]))
  assert report.report([str(tmp_path / "sw")])["spread_md"] is None
  with pytest.raises(report.ReportError):
    report.report([str(tmp_path / "missing")])


def test_spread_tables_name_what_the_seeds_vary(tmp_path):
  """A population with a per-member data order spans the data order too; seeded runs that
  share the base seed's order do not; a run without recorded configs says so."""
  from cras_jax.config import population
  from cras_jax.configs import demo

  sw = tmp_path / "sw"
  base = demo.get_config()
  base.train.population = "seed=0,1"
  members = population.member_configs(base)  # the demo's stored features: per member
  for (m, cfg), v in zip(members, ([0.9, 0.8, 0.85], [0.92, 0.82, 0.83])):
    write(sw / "full" / "results" / m, table(v))
    with open(sw / "full" / "results" / m / "member.json", "w") as f:
      json.dump({"name": m, "config": cfg.to_dict()}, f)
  names = [m for m, _ in members]
  write(sw / "full" / "results", table([0.91, 0.81, 0.84]), population="seed=0,1", members=names)
  for s in (0, 1):
    cfg = demo.get_config()
    cfg.seed, cfg.train.data_seed = s, 0  # as `sweep --seeds` pins a shared order
    write(sw / f"wo_x_seed{s}" / "results", table([0.8 + s / 100] * 3))
    with open(sw / f"wo_x_seed{s}" / "sweep_run.json", "w") as f:
      json.dump({"group": "wo_x", "config": cfg.to_dict()}, f)
    write(sw / f"old_seed{s}" / "results", table([0.7 + s / 100] * 3))
    with open(sw / f"old_seed{s}" / "sweep_run.json", "w") as f:
      json.dump({"group": "old"}, f)
  out = report.report([str(sw)], metrics="i_auroc,p_auroc")
  assert out["variance_sources"] == {
      "full": "initialisation + noise + data order",
      "wo_x": "initialisation + noise",
      "old": "not recorded",
  }
  assert (
      "Variance sources (what the seeds vary): full: initialisation + noise + data order; "
      "old: not recorded; wo_x: initialisation + noise" in out["spread_md"]
  )
  rows = (sw / "report" / "spread_final.csv").read_text().splitlines()
  assert rows[0].startswith("setting,variance_sources,class,metric,mean")
  assert any(r.startswith("full,initialisation + noise + data order,a,i_auroc,") for r in rows)
  assert any(r.startswith("wo_x,initialisation + noise,a,i_auroc,") for r in rows)
