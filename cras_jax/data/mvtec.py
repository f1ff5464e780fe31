"""MVTec-layout datasets (MVTec AD, VisA converted, MPDD, ITDD, BTAD) as a cached TFDS dataset.

The layout (docs/method.md §11) and its scanning are in ``layout``.

Before anything is computed or written, ``load_dataset`` validates the dataset
(``validate.validate``) and raises one ``DatasetError`` listing every problem. With
``allow_image_level_only=True`` defective images without a mask are kept with an all-zero mask
and ``has_mask`` 0 in the split metadata (``has_mask(source)``).

The images are decoded, resized and cropped once (``preprocess.load_example``) and stored by a
TFDS ``GeneratorBasedBuilder`` in ``array_record`` files under ``cache_dir``; they are read back
with ``builder.as_data_source()`` (random access, no TensorFlow needed anywhere). The builder
config name holds a hash of (root, classes, resize, crop, preprocessing version) and a
fingerprint of the scanned files' contents (`identity.fingerprint`: relative paths and the
SHA-256 of every file's bytes, read on every load), so a changed dataset, even one file edited
in place with its mtime restored, gets a new directory and is rebuilt, while an unchanged one
is reused. `Dataset.identity` is what a run records of its data (`identity.of_records`). The
builder is in ``mvtec_builder``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from absl import logging as absl_logging

from cras_jax.base import leases
from cras_jax.data import identity, layout, prepared_digest, preprocess, spill, validate
from cras_jax.data.mvtec_builder import SPLITS, MVTecFolder, MVTecFolderConfig, make_config

# --------------------------------------------------------------------------------------------
# Loading


@dataclasses.dataclass
class Dataset:
  class_names: list[str]
  train: object  # tfds ArrayRecordDataSource: len(), [i], __getitems__
  test: object
  builder: MVTecFolder
  records: list[layout.Record]
  identity: dict | None = None  # identity.of_records: class list, per split/class contents

  @property
  def data_dir(self) -> str:
    return os.fspath(self.builder.data_dir)

  def summary_lines(self) -> list[str]:
    lines = []
    for k, cls in enumerate(self.class_names):
      rs = [r for r in self.records if r.class_name == cls]
      n_train = sum(r.split == "train" for r in rs)
      n_good = sum(r.split == "test" and not r.is_anomaly for r in rs)
      n_bad = sum(r.split == "test" and r.is_anomaly for r in rs)
      n_nomask = sum(not r.has_mask for r in rs)
      types = sorted({r.defect_type for r in rs if r.is_anomaly})
      lines.append(
          f"[{k}] {cls}: train {n_train} | test good {n_good}, defective {n_bad}"
          + (f" ({n_nomask} without a mask)" if n_nomask else "")
          + f" | defect types: {', '.join(types) or '-'}"
      )
    return lines


def _prune_stale(builder: MVTecFolder, keep_name: str, phash: str) -> None:
  """Delete other configs of the same (root, classes, resize, crop) (older file contents)
  that no live process reads: a prepared directory with a live reader lease
  (`leases.in_use`: another run still training or evaluating on it) is kept, and pruned by a
  later preparation once that run has ended."""
  parent = Path(builder.data_dir).parent.parent  # <cache>/mvtec_folder
  if not parent.is_dir():
    return
  for d in parent.iterdir():
    parts = d.name.split("_")
    if d.is_dir() and d.name != keep_name and len(parts) == 5 and parts[3] == phash:
      if leases.in_use(os.fspath(d)):
        print(f"data cache: keeping {d} (older data, still read by a running process)")
        continue
      shutil.rmtree(d, ignore_errors=True)


def load_dataset(
    root: str | os.PathLike,
    classes: Sequence[str] | None,
    resize: int,
    crop: int,
    cache_dir: str | os.PathLike,
    *,
    num_workers: int | None = None,
    prune_stale: bool = True,
    verbose: bool = True,
    allow_image_level_only: bool = False,
    mask_rule: str = "binarise",
    limits: preprocess.Limits | None = None,
) -> Dataset:
  """Scan and validate ``root``, build (or reuse) the preprocessed cache in ``cache_dir`` and
  open it.

  Nothing is written to ``cache_dir`` unless validation passes (``validate.validate``: every
  image and mask is opened and decoded once; all problems are raised in one ``DatasetError``).
  With ``allow_image_level_only`` defective test images without a mask are accepted: their
  mask is all zeros and the split metadata's ``has_mask`` entry is 0.
  """
  records, problems, class_names = layout.collect(root, classes, check_masks=False)
  if problems and not records:  # e.g. no root: nothing more to check
    validate.validate(records, root, problems=problems, class_names=class_names)
  # Every file's bytes are hashed (and so read) on every load: the prepared copy is reused
  # only for the very same contents.
  digests = identity.file_digests(identity.record_paths(records), num_workers)
  config = make_config(root, class_names, resize, crop, records, mask_rule, digests)
  check = functools.partial(
      validate.validate,
      records,
      root,
      allow_image_level_only=allow_image_level_only,
      problems=problems,
      class_names=class_names,
      num_workers=num_workers,
      limits=limits,
  )
  return open_dataset(
      config,
      records,
      class_names,
      cache_dir,
      check,
      identity.of_records(records, class_names, root, digests),
      num_workers=num_workers,
      prune_stale=prune_stale,
      verbose=verbose,
      limits=limits,
  )


def open_dataset(
    config: MVTecFolderConfig,
    records: list[layout.Record],
    class_names: list[str],
    cache_dir: str | os.PathLike,
    check: Callable[..., None],
    data_identity: dict,
    *,
    builder_cls: type[MVTecFolder] = MVTecFolder,
    dataset_cls: type[Dataset] = Dataset,
    splits: Sequence[str] = SPLITS,
    num_workers: int | None = None,
    prune_stale: bool = True,
    verbose: bool = True,
    limits: preprocess.Limits | None = None,
) -> Dataset:
  """The prepared copy of ``config`` in ``cache_dir`` opened as a ``dataset_cls``, one source
  per split of ``splits``: reused when it is there and verified (`prepared_digest`), otherwise
  built by ``builder_cls`` from ``records``; older copies of the same parameters pruned.

  ``check(read_images=...)`` raises the dataset's problems before anything is written
  (``read_images`` False for a reused copy); ``data_identity`` is `Dataset.identity`.
  """
  # tfds logs a warning with the whole config for every custom config: silence that one.
  # (Constructing the builder writes nothing to cache_dir.)
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    builder = builder_cls(
        config=config, records=records, num_workers=num_workers, data_dir=os.fspath(cache_dir)
    )
    prepared = builder.is_prepared()
    why = prepared_digest.problem(builder.data_dir) if prepared else None
    if why:  # damaged or unverifiable: never read as data
      print(f"prepared data {builder.data_dir}: {why}; preparing it again", flush=True)
      shutil.rmtree(builder.data_dir)
      builder = builder_cls(
          config=config, records=records, num_workers=num_workers, data_dir=os.fspath(cache_dir)
      )
      prepared = builder.is_prepared()
  finally:
    absl_logging.set_verbosity(verbosity)
  # A prepared cache of this config was built from these very files (the config name holds
  # their paths and the hashes of their contents) after they passed validation: decoding is
  # skipped, the layout checks (masks present, no orphan masks) are always run.
  check(read_images=not prepared)
  builder._limits = limits
  if not prepared:
    tfds_bars = tfds.core.utils.tqdm_utils._active  # restored after the build
    tfds.display_progress_bar(False)
    with spill.sequential_spill():  # one example in memory at a time (data/spill.py)
      try:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                compute_stats=tfds.download.ComputeStatsMode.SKIP,
                try_download_gcs=False,
            )
        )
      finally:
        tfds.display_progress_bar(tfds_bars)
    prepared_digest.record(builder.data_dir)
  # This process reads the prepared directory until it ends: a lease keeps other runs
  # sharing the cache from pruning it (the caller holds the cache's prepare lock).
  leases.hold(os.fspath(Path(builder.data_dir).parent))
  if prune_stale:
    _prune_stale(builder, config.name, config.name.split("_")[3])
  sources = builder.as_data_source()
  ds = dataset_cls(
      class_names=class_names,
      builder=builder,
      records=records,
      identity=data_identity,
      **{s: sources[s] for s in splits},
  )
  if verbose:
    for line in ds.summary_lines():
      print(line)
  return ds


def _split_name(source) -> str:
  return str(getattr(source, "split", ""))


def split_metadata(source) -> dict | None:
  """The stored per-example metadata (label, is_anomaly, defect_type, name) of a split."""
  info = getattr(source, "dataset_info", None)
  meta = getattr(info, "metadata", None) if info is not None else None
  if not meta or "splits" not in meta:
    return None
  m = meta["splits"].get(_split_name(source))
  if m is None or len(m["label"]) != len(source):
    return None
  return m


def has_mask(source) -> np.ndarray:
  """Per example of the split: 1 where the pixel ground truth is known, 0 for a defective
  image loaded without a mask (``allow_image_level_only``). All ones when the metadata has
  no ``has_mask`` entry."""
  m = split_metadata(source)
  if m is not None and "has_mask" in m:
    return np.asarray(m["has_mask"], dtype=np.int32)
  return np.ones(len(source), dtype=np.int32)


def class_indices(source) -> np.ndarray:
  """Class index of every example of the split, from metadata (no image decoding)."""
  m = split_metadata(source)
  if m is not None:
    return np.asarray(m["label"], dtype=np.int32)
  return np.asarray([int(source[i]["label"]) for i in range(len(source))], dtype=np.int32)


def _to_str(x) -> str:
  return x.decode("utf-8") if isinstance(x, (bytes, bytearray)) else str(x)


def get_batch(source, indices: Sequence[int] | np.ndarray) -> dict:
  """Read examples ``indices`` and stack them: image [B,c,c,3] uint8, mask [B,c,c] uint8,
  label [B] int32, is_anomaly [B] int32, defect_type / name lists of str."""
  idx = [int(i) for i in np.asarray(indices).reshape(-1)]
  exs = source.__getitems__(idx) if idx else []
  if not exs:
    raise ValueError("get_batch needs at least one index")
  return {
      "image": np.stack([e["image"] for e in exs]),
      "mask": np.stack([e["mask"] for e in exs]),
      "label": np.asarray([e["label"] for e in exs], dtype=np.int32),
      "is_anomaly": np.asarray([e["is_anomaly"] for e in exs], dtype=np.int32),
      "defect_type": [_to_str(e["defect_type"]) for e in exs],
      "name": [_to_str(e["name"]) for e in exs],
  }
