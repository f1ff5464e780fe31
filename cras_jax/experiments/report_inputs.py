"""The report's inputs: which workdirs hold results, their tables and protocols, and their
seed groups (`settings`).

A run is a workdir with `results/metrics_<tag>.json`; a sweep directory holds runs. A
population run (`train.population`) also holds one table per member
(`results/<member>/metrics_<tag>.json`); `settings` gathers the tables of one setting over its
seeds: a population's members that differ only in `seed`, or the separate runs a sweep with
`--seeds` recorded under one group; `variance_sources` says what each setting's seeds vary
(their configs: a member's `results/<member>/member.json`, a seeded run's `sweep_run.json`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from cras_jax.base import schema
from cras_jax.config import population
from cras_jax.experiments.sweep_plan import read_json as _read_json
from cras_jax.method import metrics as metrics_lib

MEAN = "mean"


class ReportError(ValueError):
  pass


# ----------------------------------------------------------------------------- gathering


def results_path(workdir, tag: str = "final") -> str:
  return os.path.join(workdir, "results", f"metrics_{tag}.json")


def find_runs(paths: Sequence[str], tag: str = "final") -> tuple[list[tuple[str, str]], list[str]]:
  """-> ([(name, workdir)] in order, notes about directories without results)."""
  runs, notes = [], []
  for arg in paths:
    name = None
    if not os.path.exists(arg) and "=" in arg:
      name, arg = arg.split("=", 1)
    if not os.path.isdir(arg):
      raise ReportError(f"{arg}: no such directory")
    if os.path.exists(results_path(arg, tag)):
      runs.append((name or os.path.basename(os.path.normpath(arg)), arg))
      continue
    # A sweep directory: its sub-directories, in the sweep's order, then the rest by name.
    subdirs = sorted(d for d in os.listdir(arg) if os.path.isdir(os.path.join(arg, d)))
    order = (_read_json(os.path.join(arg, "sweep.json")) or {}).get("runs", [])
    ordered = [d for d in order if d in subdirs] + [d for d in subdirs if d not in order]
    found = False
    for d in ordered:
      sub = os.path.join(arg, d)
      if os.path.exists(results_path(sub, tag)):
        runs.append((d, sub))
        found = True
      elif d in order or os.path.exists(os.path.join(sub, "sweep_run.json")):
        rec = _read_json(os.path.join(sub, "sweep_run.json")) or {}
        notes.append(f"{d}: no metrics_{tag}.json (sweep status: {rec.get('status', 'not run')})")
    if not found:
      raise ReportError(
          f"{arg}: neither a workdir with {results_path('', tag)} nor a sweep "
          f"directory holding any"
      )
  names = [n for n, _ in runs]
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise ReportError(f"several runs named {', '.join(dup)}: name them, NAME=DIR")
  return runs, notes


def load_run(name: str, workdir: str, tag: str = "final") -> dict:
  """A run's results: name, workdir, metrics (with a mean row), protocol, record."""
  res = _read_json(results_path(workdir, tag))
  if res is None or "metrics" not in res:
    raise ReportError(f"{results_path(workdir, tag)}: unreadable or without 'metrics'")
  table = dict(res["metrics"])
  if MEAN not in table:
    table = metrics_lib.summarise(table)
  members, member_configs = [], []
  for m in res.get("members", []) if res.get("population") else []:
    sub = _read_json(os.path.join(workdir, "results", m, f"metrics_{tag}.json"))
    if sub is None or "metrics" not in sub:
      raise ReportError(f"{workdir}: member {m} has no readable metrics_{tag}.json")
    members.append((m, sub["metrics"]))
    member_configs.append(
        (_read_json(os.path.join(workdir, "results", m, "member.json")) or {}).get("config")
    )
  return {
      "name": name,
      "workdir": workdir,
      "metrics": table,
      "members": members,
      "member_configs": member_configs,  # each member's single-run config, None if unrecorded
      "protocol": res.get("protocol") or "unknown",
      "results": res,
      "record": _read_json(os.path.join(workdir, "sweep_run.json")),
  }


def protocol_kind(protocol: str) -> str:
  """Protocols compared for mixing: step/epoch numbers aside ("checkpoint of step N")."""
  return re.sub(r"\d+", "N", protocol)


def check_protocols(runs: Sequence[dict], allow_mixed: bool = False) -> str | None:
  """None if every row has the same protocol; else a warning (allow_mixed) or ReportError."""
  kinds = {protocol_kind(r["protocol"]) for r in runs}
  if len(kinds) <= 1:
    return None
  listing = "; ".join(f"{r['name']}: {r['protocol']}" for r in runs)
  if not allow_mixed:
    raise ReportError(
        f"the runs were reported under different protocols ({listing}); "
        f"compare like with like, or pass --allow_mixed_protocols to mark them"
    )
  return f"**Mixed protocols**: the rows are not comparable as they stand ({listing})."


def settings(runs: Sequence[dict]) -> list[tuple[str, list[dict]]]:
  """[(setting, [per-class table of each seed])] in the runs' order (module docstring)."""
  out: dict[str, list[dict]] = {}
  for r in runs:
    if r["members"]:
      values = population.members(r["results"]["population"])
      for v, (_, table) in zip(values, r["members"]):
        rest = population.member_name({k: x for k, x in v.items() if k != "seed"})
        out.setdefault(f"{r['name']}:{rest}" if rest else r["name"], []).append(table)
      continue
    group = (r["record"] or {}).get("group") or r["name"]
    out.setdefault(group, []).append(r["metrics"])
  return list(out.items())


NOT_RECORDED = "not recorded"


def variance_sources(runs: Sequence[dict]) -> dict[str, str]:
  """{setting: what its seeds vary} for the settings of `settings` (`population.
  variance_sources` of their configs: "initialisation + noise", "initialisation + noise + data
  order"); "not recorded" where a run's config is not."""
  configs: dict[str, list] = {}
  recorded: dict[str, str] = {}  # a population of seeds alone: its own label, if it has one
  for r in runs:
    if r["members"]:
      values = population.members(r["results"]["population"])
      if all(list(v) == ["seed"] for v in values) and r["results"].get("variance_sources"):
        recorded[r["name"]] = r["results"]["variance_sources"]
      for v, cfg in zip(values, r.get("member_configs") or [None] * len(values)):
        rest = population.member_name({k: x for k, x in v.items() if k != "seed"})
        configs.setdefault(f"{r['name']}:{rest}" if rest else r["name"], []).append(cfg)
      continue
    record = r["record"] or {}
    configs.setdefault(record.get("group") or r["name"], []).append(record.get("config"))
  return {
      name: (
          recorded.get(name, NOT_RECORDED)
          if any(c is None for c in cfgs)
          else population.variance_sources(
              schema.filled(c) if isinstance(c, dict) else c for c in cfgs
          )
      )
      for name, cfgs in configs.items()
  }
