"""The TFDS builder of an MVTec-layout dataset (``mvtec.load_dataset`` uses it): one builder
config per (root, classes, resize, crop, mask rule, preprocessing version) and fingerprint of the
scanned files' contents (``make_config``: the SHA-256 of every file's bytes), whose examples
are the images decoded, resized and cropped once (``preprocess.load_example``), stored in
``array_record`` files."""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import itertools
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from cras_jax.base import progress
from cras_jax.data import identity, layout, preprocess

SPLITS = ("train", "test")
BUILDER_VERSION = "1.2.0"


def _relname(rec_path: str, root: str) -> str:
  return Path(os.path.relpath(rec_path, root)).as_posix()


def content_fingerprint(
    records: Sequence[layout.Record],
    root: str | os.PathLike,
    digests: dict[str, str] | None = None,
) -> str:
  """sha256 (hex) over every image/mask's place in the layout and the SHA-256 of its bytes
  (`digests`: `identity.file_digests` of the records' files, computed when not given)."""
  if digests is None:
    digests = identity.file_digests(identity.record_paths(records))
  return identity.fingerprint(records, root, digests)


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
    digests: dict[str, str] | None = None,
    layout_name: str | None = None,
) -> MVTecFolderConfig:
  """The config named ``r<resize>_c<crop>_k<classes>_<params hash>_<content hash>``; a
  ``layout_name`` (another layout read into this builder, e.g. "mvtec_ad2") is hashed into
  the parameters' hash, so that its prepared copies never share a name with the MVTec
  layout's."""
  phash = params_hash(root, class_names, resize, crop, mask_rule)
  if layout_name is not None:
    phash = hashlib.sha256(json.dumps([phash, layout_name]).encode()).hexdigest()
  phash = phash[:10]
  fp = content_fingerprint(records, root, digests)[:12]
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
