"""The single-class setting (`config.setting="single_class"`): one model per class.

Every class is trained (or evaluated) as a multi-class run of one class, one after another,
in <workdir>/classes/<class>, on the same data (generated or prepared once, in the parent
workdir's cache); their per-class rows are gathered into one table in <workdir>/results.
Here: the per-class runs (`single_class_configs`) and the table (`gather`); the loop over the
classes is the caller's (training/train.py: `train_and_evaluate`, `evaluate_checkpoint`).
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections

from cras_jax import data as data_lib
from cras_jax.data import datasets, layout
from cras_jax.method import metrics as metrics_lib
from cras_jax.results import tables as results
from cras_jax.runs import specs


def single_class_configs(config, workdir: str) -> dict:
  """The per-class runs of the single-class setting: class -> (config, sub-workdir)."""
  data = specs.data_spec(config)
  root = data_lib.prepare_data_root(data, workdir)
  classes = datasets.resolve_classes(
      config.data.name, config.data.classes
  ) or layout.discover_classes(root)
  runs = {}
  for cls in classes:
    sub = ml_collections.ConfigDict(config.to_dict())
    sub.setting = "multi_class"  # one model, here for a single class
    sub.data.classes = (cls,)
    sub.data.root = root
    sub.data.cache_dir = data_lib.cache_dir(data, workdir)
    runs[cls] = (sub, os.path.join(workdir, "classes", cls))
  return runs


def gather(config, workdir: str, per_class: dict, tag: str) -> dict:
  """The one table of the single-class setting: the per-class rows of every class's run
  (`per_class`: class -> (config, sub-workdir), each run done) gathered into workdir/results
  (metrics_<tag>.*)."""
  table, protocols, steps = {}, set(), {}
  for cls, (_, subdir) in per_class.items():
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
      "runs": {c: os.path.relpath(d, workdir) for c, (_, d) in per_class.items()},
      "score_mode": config.model.score_mode,
      "matching": config.model.matching,
  }
  if jax.process_index() == 0:
    results.write_results(table, os.path.join(workdir, "results"), tag, extra)
  print(f"\n[{tag}] single-class setting, {len(per_class)} models (protocol: {extra['protocol']})")
  print(results.markdown(table), flush=True)
  return table


def announce(i: int, per_class: dict, cls: str) -> None:
  """The line that opens the run of class `cls` (the i-th, from 0)."""
  subdir = per_class[cls][1]
  print(f"\n=== single-class setting: {cls} ({i + 1}/{len(per_class)}) -> {subdir}", flush=True)
