"""Data: datasets in the MVTec layout through TFDS, and the synthetic demo set, as a
`spec.DataSpec` describes them."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable

import numpy as np

from cras_jax.base import fs, registry
from cras_jax.data import combined as combined_lib
from cras_jax.data import datasets, fetch, mvtec, mvtec_ad2, real_iad, synthetic
from cras_jax.data.spec import DataSpec


def prepare_data_root(spec: DataSpec, workdir: str) -> str:
  """The dataset directory, ready to read: spec.root, or the synthetic demo set,
  generated into <workdir>/synthetic_data first (once: `synthetic.generate` reuses a
  complete tree), or a named dataset in <data_dir>/<name> (`fetch.ensure`: fetched and
  prepared once)."""
  if spec.name == "synthetic":
    root = spec.root or os.path.join(workdir, "synthetic_data")
    s = spec.synthetic
    synthetic.generate(
        root,
        seed=s.seed,
        image_size=s.image_size,
        n_train=s.n_train,
        n_test_good=s.n_test_good,
        n_test_defect_per_type=s.n_test_defect_per_type,
    )
    return root
  if not spec.root and spec.fetch is not None and registry.fetchable(spec.name):
    return fetch.ensure(spec.fetch)
  if not spec.root:
    raise ValueError(
        f"config.data.root is empty: set --config.data.root=<directory of the "
        f"{spec.name} dataset in the MVTec layout>"
    )
  return os.path.expanduser(spec.root)


def cache_dir(spec: DataSpec, workdir: str) -> str:
  """Where the prepared data is kept: spec.cache_dir, by default <workdir>/data_cache."""
  return spec.cache_dir or os.path.join(workdir, "data_cache")


def load(spec: DataSpec, workdir: str):
  """The dataset of a spec. Generation and TFDS preparation run under an exclusive
    file lock in the cache directory: the processes of a multi-process run (or two
    runs sharing a cache) prepare it once, one after another, instead of racing.
    MVTec AD 2 (a registered dataset of layout "mvtec_ad2") is read in its own layout, with its
    validation split (`mvtec_ad2.load_dataset`, the same lock); Real-IAD through its JSON splits
  (`real_iad.load_dataset`)."""
  entry = registry.dataset(spec.name)
  if spec.name == combined_lib.NAME:  # several datasets' classes as one (data/combined.py)
    return load_locked(spec, workdir, mvtec.load_dataset, combined=True)
  if entry is not None and entry.layout == "mvtec_ad2":
    return load_locked(spec, workdir, mvtec_ad2.load_dataset)
  if entry is not None and entry.layout == "real_iad":  # its JSON splits (data/real_iad.py)
    return load_locked(spec, workdir, real_iad.load_dataset)
  return load_locked(spec, workdir, mvtec.load_dataset)


def load_locked(spec: DataSpec, workdir: str, load_dataset: Callable, combined: bool = False):
  """``load_dataset(root, classes, resize, crop, cache, ...)`` of a spec (`mvtec.load_dataset`
  and its like), its root resolved (`prepare_data_root`), under the cache's exclusive lock;
  `combined`: the sources' roots resolved and their classes linked into one
  (`combined.resolve`)."""
  cache = cache_dir(spec, workdir)
  fs.writable_dir(
      cache, "the data cache (data.cache_dir)", "set --config.data.cache_dir to a writable folder"
  )
  with open(os.path.join(cache, ".prepare.lock"), "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      if combined:
        root, classes = combined_lib.resolve(spec, workdir, prepare_data_root, cache)
      else:
        root = prepare_data_root(spec, workdir)
        classes = datasets.resolve_classes(spec.name, spec.classes)
      return load_dataset(
          root,
          classes,
          spec.resize,
          spec.crop,
          cache,
          allow_image_level_only=spec.allow_image_level_only,
          mask_rule=spec.mask_rule,
          limits=spec.limits,
      )
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def get_batch(source, indices, keys=None) -> dict:
  batch = mvtec.get_batch(source, np.asarray(indices))
  if keys is not None:
    batch = {k: batch[k] for k in keys}
  return batch


def class_indices(source) -> np.ndarray:
  return mvtec.class_indices(source)


def has_mask(source) -> np.ndarray:
  """1 where an example's mask is known (normal images, or defective with a mask)."""
  return mvtec.has_mask(source)


def padded_indices(indices, batch_size: int, multiple: int = 1):
  """`indices` padded (by repeating the last one) to `batch_size` rounded up to
  `multiple`, and a 0/1 weight marking the real entries."""
  size = -(-batch_size // multiple) * multiple
  indices = np.asarray(indices)
  full = np.concatenate([indices, np.repeat(indices[-1:], size - len(indices))])
  return full, (np.arange(size) < len(indices)).astype(np.float32)


def padded_batch(source, indices, batch_size: int, multiple: int = 1) -> dict:
  """The batch of `padded_indices`, with its `weight`."""
  full, weight = padded_indices(indices, batch_size, multiple)
  batch = get_batch(source, full)
  batch["weight"] = weight
  return batch
