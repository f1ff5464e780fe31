"""Helpers to read the reference vectors recorded from the authors' PyTorch CRAS."""
from __future__ import annotations

import os

import numpy as np

PATH = os.path.join(os.path.dirname(__file__), "data", "cras_reference_small.npz")


def load():
  d = np.load(PATH)
  return {k: d[k] for k in d.files}


def nhwc(x):
  return np.transpose(x, (0, 2, 3, 1))


def adapter_params(g, prefix):
  return {"fc0": {"kernel": g[f"{prefix}/layers.0fc.weight"].T,
                  "bias": g[f"{prefix}/layers.0fc.bias"]}}


def disc_variables(g, prefix):
  params, stats = {}, {}
  for i in (1, 2):
    p = f"{prefix}/body.block{i}"
    params[f"block{i}_fc"] = {"kernel": g[f"{p}.0.weight"].T, "bias": g[f"{p}.0.bias"]}
    params[f"block{i}_bn"] = {"scale": g[f"{p}.1.weight"], "bias": g[f"{p}.1.bias"]}
    stats[f"block{i}_bn"] = {"mean": g[f"{p}.1.running_mean"], "var": g[f"{p}.1.running_var"]}
  params["tail"] = {"kernel": g[f"{prefix}/tail.0.weight"].T}
  return params, stats


def heads_variables(g, prefix_a="adapter_init", prefix_d="disc_init"):
  dp, ds = disc_variables(g, prefix_d)
  return {"adapter": adapter_params(g, prefix_a), "disc": dp}, {"disc": ds}
