"""predict's decisions on crops, for the tests that hold the exports' scorers to them."""

import numpy as np

from cras_jax.scoring import predicting, scoring


def predict_decisions(run, thr, images) -> dict:
  """What `python -m cras_jax.predict` decides on uint8 crops (its `score_batch`: the rows of
  results.csv and the mask files): anomalous [N] (int; -1 without an image threshold) and
  masks [N, crop, crop] (None without a pixel threshold)."""
  n = len(images)
  scorer = scoring.Scorer.for_run(run, n, per_image=True)
  names = [f"crop{i}" for i in range(n)]
  records = predicting.score_batch(
      scorer, thr, run.class_names, list(range(n)), list(images), names, names
  )
  anomalous = [r.row["anomalous"] for r in records]
  masks = [r.mask for r in records]
  return {
      "anomalous": np.array([-1 if a is None else a for a in anomalous]),
      "masks": None if masks[0] is None else np.stack(masks).astype(np.uint8),
  }
