"""Per-class result tables from scored test images."""

import math

import numpy as np
from sklearn.metrics import roc_auc_score

from cras_jax.results import tables as results


def _res(has_mask):
  rng = np.random.default_rng(0)
  n = 8
  label = np.array([0, 0, 0, 0, 1, 1, 1, 1])
  is_anomaly = np.array([0, 1, 0, 1, 0, 1, 0, 1])
  masks = np.zeros((n, 6, 6), np.uint8)
  masks[is_anomaly == 1, 2:4, 2:4] = 1
  maps = rng.random((n, 6, 6)).astype(np.float32) + masks
  return {
      "label": label,
      "is_anomaly": is_anomaly,
      "mask": masks,
      "maps": maps,
      "scores": maps.reshape(n, -1).max(-1),
      "cls": np.array([0, 0, 0, 1, 1, 1, 1, 1]),
      "has_mask": np.asarray(has_mask),
  }


def test_class_metrics_and_image_level_only_classes():
  res = _res([1, 1, 1, 1, 1, 0, 1, 1])  # class 1 has a defective image without a mask
  table = results.class_metrics(res, ["a", "b"])
  sel = res["label"] == 0
  assert math.isclose(
      table["a"]["p_auroc"], roc_auc_score(res["mask"][sel].ravel(), res["maps"][sel].ravel())
  )
  assert math.isclose(
      table["b"]["i_auroc"], roc_auc_score(res["is_anomaly"][4:], res["scores"][4:])
  )
  for key in ("p_auroc", "p_ap", "aupro"):
    assert math.isnan(table["b"][key])
    assert table["mean"][key] == table["a"][key]  # the mean skips absent values
  assert table["a"]["match_acc"] == 0.75 and table["b"]["match_acc"] == 1.0
