"""MCMC centres (docs/method.md §4): per-class means of the adapted features.

Computed once before training with the frozen backbone and the freshly
initialised adapter, by streaming sums so any number of images fits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cras_jax.base import schema

CENTRE_MODES = schema.choices("model.centre")


def centre_weights(labels: np.ndarray, mode: str = "mean") -> np.ndarray:
  """Which training images (in training-set order) form the centres: all of them
  ("mean", MCMC) or the first image of each class ("single", the "w/o MCMC" ablation)."""
  labels = np.asarray(labels)
  if mode == "mean":
    return np.ones(labels.shape, np.float32)
  if mode == "single":
    w = np.zeros(labels.shape, np.float32)
    w[np.unique(labels, return_index=True)[1]] = 1.0
    return w
  raise ValueError(f"config.model.centre={mode!r}: choose one of {CENTRE_MODES}")


def accumulate(sums, counts, u: jax.Array, labels: jax.Array, weights: jax.Array | None = None):
  """Adds a batch u [B, HW, D] with class labels [B] (weights [B] mask padding)."""
  if weights is None:
    weights = jnp.ones(labels.shape, jnp.float32)
  k = sums.shape[0]
  sums = sums + jax.ops.segment_sum(u * weights[:, None, None], labels, num_segments=k)
  counts = counts + jax.ops.segment_sum(weights, labels, num_segments=k)
  return sums, counts


def finalise(sums, counts) -> jax.Array:
  """c_k = sum / count; raises via NaN-free division only where count > 0."""
  return sums / jnp.maximum(counts, 1.0)[:, None, None]
