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
fingerprint of the scanned files (relative paths, sizes, mtimes), so a changed dataset gets a
new directory and is rebuilt, while an unchanged one is reused.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from absl import logging as absl_logging
from etils import epath
from tensorflow_datasets.core import shuffle as tfds_shuffle

from cras_jax.base import progress
from cras_jax.data import layout, preprocess, validate

SPLITS = ("train", "test")
BUILDER_VERSION = "1.2.0"


def _relname(rec_path: str, root: str) -> str:
  return Path(os.path.relpath(rec_path, root)).as_posix()


def content_fingerprint(records: Iterable[layout.Record], root: str | os.PathLike) -> str:
  """sha256 over every image/mask relative path, size and mtime (hex)."""
  h = hashlib.sha256()
  root = os.fspath(root)
  for r in records:
    for p in (r.image_path, r.mask_path):
      if p is None:
        h.update(b"-\n")
        continue
      st = os.stat(p)
      h.update(
          f"{r.class_name}|{r.split}|{r.defect_type}|{_relname(p, root)}|"
          f"{st.st_size}|{st.st_mtime_ns}\n".encode()
      )
  return h.hexdigest()


def params_hash(
    root: str | os.PathLike,
    classes: Sequence[str],
    resize: int,
    crop: int,
    mask_rule: str = "binarise",
) -> str:
  key = json.dumps(
      [
          os.path.abspath(os.fspath(root)),
          list(classes),
          int(resize),
          int(crop),
          preprocess.PREPROCESS_VERSION,
          BUILDER_VERSION,
      ]
      + ([] if mask_rule == "binarise" else [mask_rule])
  )
  return hashlib.sha256(key.encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# TFDS builder


@dataclasses.dataclass(eq=False)
class MVTecFolderConfig(tfds.core.BuilderConfig):
  root: str = ""
  class_names: tuple[str, ...] = ()
  resize: int = 329
  crop: int = 288
  fingerprint: str = ""
  mask_rule: str = "binarise"  # preprocess.MASK_RULES


def make_config(
    root,
    class_names: Sequence[str],
    resize: int,
    crop: int,
    records: Sequence[layout.Record],
    mask_rule: str = "binarise",
) -> MVTecFolderConfig:
  phash = params_hash(root, class_names, resize, crop, mask_rule)[:10]
  fp = content_fingerprint(records, root)[:12]
  return MVTecFolderConfig(
      name=f"r{int(resize)}_c{int(crop)}_k{len(class_names)}_{phash}_{fp}",
      description=f"{len(class_names)} classes, resize {resize}, crop {crop}",
      root=os.path.abspath(os.fspath(root)),
      class_names=tuple(class_names),
      resize=int(resize),
      crop=int(crop),
      fingerprint=fp,
      mask_rule=mask_rule,
  )


def _split_metadata(
    records: Sequence[layout.Record], class_names: Sequence[str], root: str
) -> dict:
  index = {c: i for i, c in enumerate(class_names)}
  return {
      "label": [index[r.class_name] for r in records],
      "is_anomaly": [int(r.is_anomaly) for r in records],
      "defect_type": [r.defect_type for r in records],
      "name": [_relname(r.image_path, root) for r in records],
      # 0 for a defective image stored without a mask (allow_image_level_only=True): its
      # stored mask is all zeros and means "unknown", not "no defect".
      "has_mask": [int(r.has_mask) for r in records],
  }


class MVTecFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Preprocessed MVTec-layout images; one config per (root, classes, resize, crop, content)."""

  name = "mvtec_folder"
  VERSION = tfds.core.Version(BUILDER_VERSION)
  RELEASE_NOTES = {
      "1.0.0": "Preprocessed uint8 images and {0,1} masks (zlib).",
      "1.1.0": "Masks stored as raw bytes (faster reads, same file size).",
      "1.2.0": "Split metadata 'has_mask' (0: defective image without a pixel mask).",
  }

  def __init__(
      self,
      *,
      config: MVTecFolderConfig,
      records: Sequence[layout.Record] | None = None,
      num_workers: int | None = None,
      **kwargs,
  ):
    if records is None:
      records = layout.scan_mvtec(config.root, config.class_names)
    self._records = list(records)
    self._num_workers = num_workers or max(1, os.cpu_count() or 1)
    self._limits: preprocess.Limits | None = None  # set by load_dataset
    kwargs.setdefault("file_format", tfds.core.file_adapters.FileFormat.ARRAY_RECORD)
    super().__init__(config=config, **kwargs)

  # tfds locates the builder's source file through `importlib_resources` (a backport package
  # that is not installed) for builders inside a package; the path is only used to look for
  # a checksums file, which this builder does not have.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return epath.Path(__file__)

  # tfds' own messages and bars name its temporary directories ("Shuffling
  # .../incomplete.XXXX/..."): they are replaced by one line and one bar per split.
  def _log_download_bytes(self) -> None:
    n = {s: len(self._split_records(s)) for s in SPLITS}
    cfg = self.builder_config
    print(
        f"preparing the dataset ({n['train']} train, {n['test']} test images; resize "
        f"{cfg.resize}, crop {cfg.crop}; once, reused by later runs)",
        flush=True,
    )

  def _log_download_done(self) -> None:
    pass

  def _split_records(self, split: str) -> list[layout.Record]:
    return [r for r in self._records if r.split == split]

  def _info(self) -> tfds.core.DatasetInfo:
    cfg: MVTecFolderConfig = self.builder_config
    c = cfg.crop
    meta = tfds.core.MetadataDict(
        class_names=list(cfg.class_names),
        resize=cfg.resize,
        crop=cfg.crop,
        fingerprint=cfg.fingerprint,
        splits={
            s: _split_metadata(self._split_records(s), cfg.class_names, cfg.root) for s in SPLITS
        },
    )
    Tensor, Enc = tfds.features.Tensor, tfds.features.Encoding
    return tfds.core.DatasetInfo(
        builder=self,
        description="MVTec-layout anomaly detection images, resized and centre-cropped.",
        features=tfds.features.FeaturesDict(
            {
                # Raw bytes: no int64 up-casting, decoded with np.frombuffer.
                "image": Tensor(shape=(c, c, 3), dtype=np.uint8, encoding=Enc.BYTES),
                # Raw bytes too: array_record's own (brotli) compression already shrinks the
                # mostly-zero masks to almost nothing; an extra zlib layer only cost read time.
                "mask": Tensor(shape=(c, c), dtype=np.uint8, encoding=Enc.BYTES),
                "label": Tensor(shape=(), dtype=np.int32),
                "is_anomaly": Tensor(shape=(), dtype=np.int32),
                "defect_type": tfds.features.Text(),
                "name": tfds.features.Text(),
            }
        ),
        metadata=meta,
        disable_shuffling=True,  # keep scan order; index i == metadata entry i
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {s: self._generate_examples(split=s) for s in SPLITS}

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
    cfg: MVTecFolderConfig = self.builder_config
    recs = self._split_records(split)
    index = {c: i for i, c in enumerate(cfg.class_names)}

    def work(r: layout.Record):
      return preprocess.load_example(
          r.image_path, r.mask_path, cfg.resize, cfg.crop, cfg.mask_rule, self._limits
      )

    # Decoding (PNG/JPEG) and PIL resizing release the GIL, so threads run in parallel;
    # a sliding window of futures keeps every worker busy while examples are yielded in
    # order (tfds serialises them in this thread).
    window = 4 * self._num_workers
    bar = progress.bar(len(recs), desc=f"prepare {split}", unit="img")
    with bar, concurrent.futures.ThreadPoolExecutor(self._num_workers) as pool:
      pending: collections.deque = collections.deque()
      todo = iter(enumerate(recs))
      for i, r in itertools.islice(todo, window):
        pending.append((i, r, pool.submit(work, r)))
      while pending:
        i, r, future = pending.popleft()
        image, mask = future.result()
        nxt = next(todo, None)
        if nxt is not None:
          pending.append((nxt[0], nxt[1], pool.submit(work, nxt[1])))
        bar.update(1)
        yield i, {
            "image": image,
            "mask": mask,
            "label": index[r.class_name],
            "is_anomaly": int(r.is_anomaly),
            "defect_type": r.defect_type,
            "name": _relname(r.image_path, cfg.root),
        }


# --------------------------------------------------------------------------------------------
# Loading


@dataclasses.dataclass
class Dataset:
  class_names: list[str]
  train: object  # tfds ArrayRecordDataSource: len(), [i], __getitems__
  test: object
  builder: MVTecFolder
  records: list[layout.Record]

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


@contextlib.contextmanager
def _in_memory_shuffler(n_bytes: int):
  """Keep tfds' example shuffler in memory for a split of ``n_bytes``.

  tfds collects a split's serialized examples in memory (sorted by key, as
  ``disable_shuffling`` asks) but spills them to temporary bucket files once they pass
  ``shuffle.MAX_MEM_BUFFER_SIZE`` (1 GB), and that spill path uses ``tf.io.gfile``: it needs
  TensorFlow. Raising the threshold for the duration of the build keeps it TF-free; the cost
  is RAM of about the largest split's size (MVTec AD train at 288: ~1.2 GB).
  """
  old = tfds_shuffle.MAX_MEM_BUFFER_SIZE
  tfds_shuffle.MAX_MEM_BUFFER_SIZE = max(old, int(n_bytes))
  try:
    yield
  finally:
    tfds_shuffle.MAX_MEM_BUFFER_SIZE = old


def _prune_stale(builder: MVTecFolder, keep_name: str, phash: str) -> None:
  """Delete other configs of the same (root, classes, resize, crop): older file contents."""
  parent = Path(builder.data_dir).parent.parent  # <cache>/mvtec_folder
  if not parent.is_dir():
    return
  for d in parent.iterdir():
    parts = d.name.split("_")
    if d.is_dir() and d.name != keep_name and len(parts) == 5 and parts[3] == phash:
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
  config = make_config(root, class_names, resize, crop, records, mask_rule)
  # tfds logs a warning with the whole config for every custom config: silence that one.
  # (Constructing the builder writes nothing to cache_dir.)
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    builder = MVTecFolder(
        config=config, records=records, num_workers=num_workers, data_dir=os.fspath(cache_dir)
    )
    prepared = builder.is_prepared()
  finally:
    absl_logging.set_verbosity(verbosity)
  # A prepared cache of this config was built from these very files (the config name holds
  # their paths, sizes and mtimes) after they passed validation: decoding them again is
  # skipped, the layout checks (masks present, no orphan masks) are always run.
  validate.validate(
      records,
      root,
      allow_image_level_only=allow_image_level_only,
      problems=problems,
      class_names=class_names,
      read_images=not prepared,
      num_workers=num_workers,
      limits=limits,
  )
  builder._limits = limits
  if not prepared:
    largest = max(sum(r.split == s for r in records) for s in SPLITS)
    tfds_bars = tfds.core.utils.tqdm_utils._active  # restored after the build
    tfds.display_progress_bar(False)
    with _in_memory_shuffler(largest * (4 * crop * crop + 1024) * 2):
      try:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                compute_stats=tfds.download.ComputeStatsMode.SKIP,
                try_download_gcs=False,
            )
        )
      finally:
        tfds.display_progress_bar(tfds_bars)
  if prune_stale:
    _prune_stale(builder, config.name, config.name.split("_")[3])
  sources = builder.as_data_source()
  ds = Dataset(
      class_names=class_names,
      train=sources["train"],
      test=sources["test"],
      builder=builder,
      records=records,
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
