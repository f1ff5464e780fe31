"""Helpers to read the reference vectors recorded from the authors' PyTorch CRAS."""

from __future__ import annotations

import os

import numpy as np

PATH = os.path.join(os.path.dirname(__file__), "fixtures", "cras_reference_small.npz")


def load():
  d = np.load(PATH)
  return {k: d[k] for k in d.files}


def nhwc(x):
  return np.transpose(x, (0, 2, 3, 1))


def adapter_params(g, prefix):
  return {
      "fc0": {"kernel": g[f"{prefix}/layers.0fc.weight"].T, "bias": g[f"{prefix}/layers.0fc.bias"]}
  }


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


def assert_one_step_equal(actual: dict, desired: dict, lr_adapter: float, lr_disc: float):
  """Compares flattened results of one training step within 1e-5 (relative to scale).

  Biases whose gradient is zero in exact arithmetic (the adapter bias and the Linear
  biases that feed a BatchNorm) take Adam steps of rounding noise of up to +-lr, as in
  the reference (see tests/fixtures/README.md): those are compared within 2 lr.
  """
  zero_grad = {
      "['params']['adapter']['fc0']['bias']": 2 * lr_adapter,
      "['params']['disc']['block1_fc']['bias']": 2 * lr_disc,
      "['params']['disc']['block2_fc']['bias']": 2 * lr_disc,
  }
  assert actual.keys() == desired.keys()
  for k in desired:
    scale = max(1.0, float(np.abs(desired[k]).max()))
    np.testing.assert_allclose(
        actual[k], desired[k], atol=zero_grad.get(k, 1e-5 * scale), rtol=1e-5, err_msg=k
    )
