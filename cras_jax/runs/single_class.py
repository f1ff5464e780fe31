"""The single-class setting (`config.setting="single_class"`): one model per class.

Every class is trained (or evaluated) as a multi-class run of one class, one after another,
in <workdir>/classes/<class>, on the same data (generated or prepared once, in the parent
workdir's cache); their per-class rows are gathered into one table in <workdir>/results.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import jax
import ml_collections

from cras_jax import data as data_lib
from cras_jax.method import metrics as metrics_lib
from cras_jax.runs import results
from cras_jax.data import datasets, layout

SETTINGS = ("multi_class", "single_class")


def check_setting(config) -> None:
  if config.setting not in SETTINGS:
    raise ValueError(
        f"config.setting={config.setting!r}: choose 'multi_class' (one model for "
        f"all classes) or 'single_class' (one model per class)"
    )


def single_class_configs(config, workdir: str) -> dict:
  """The per-class runs of the single-class setting: class -> (config, sub-workdir)."""
  root = data_lib.prepare_data_root(config, workdir)
  classes = datasets.resolve_classes(
      config.data.name, config.data.classes
  ) or layout.discover_classes(root)
  runs = {}
  for cls in classes:
    sub = ml_collections.ConfigDict(config.to_dict())
    sub.setting = "multi_class"  # one model, here for a single class
    sub.data.classes = (cls,)
    sub.data.root = root
    sub.data.cache_dir = config.data.cache_dir or os.path.join(workdir, "data_cache")
    runs[cls] = (sub, os.path.join(workdir, "classes", cls))
  return runs


def run(
    config, workdir: str, run_one: Callable[[ml_collections.ConfigDict, str], object], tag: str
) -> dict:
  """Runs `run_one(config, workdir)` (training or evaluation) for every class, one after
  another, and gathers their per-class rows into one table in workdir/results
  (metrics_<tag>.*)."""
  runs = single_class_configs(config, workdir)
  table, protocols, steps = {}, set(), {}
  for i, (cls, (sub, subdir)) in enumerate(runs.items()):
    print(f"\n=== single-class setting: {cls} ({i + 1}/{len(runs)}) -> {subdir}", flush=True)
    run_one(sub, subdir)
    with open(os.path.join(subdir, "results", f"metrics_{tag}.json")) as f:
      res = json.load(f)
    table[cls] = res["metrics"][cls]
    protocols.add(res["protocol"])
    steps[cls] = res["step"]
  table = metrics_lib.summarise(table)
  extra = {
      "setting": "single_class",
      "protocol": " / ".join(sorted(protocols)),
      "step": steps,
      "runs": {c: os.path.relpath(d, workdir) for c, (_, d) in runs.items()},
      "score_mode": config.model.score_mode,
      "matching": config.model.matching,
  }
  if jax.process_index() == 0:
    results.write_results(table, os.path.join(workdir, "results"), tag, extra)
  print(f"\n[{tag}] single-class setting, {len(runs)} models (protocol: {extra['protocol']})")
  print(results.markdown(table), flush=True)
  return table
