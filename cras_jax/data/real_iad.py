"""Real-IAD (CVPR 2024) read as released: its per-category JSON split files name every image.

Layout (``EXPECTED_LAYOUT``)::

    <root>/realiad_<res>/<category>/OK/S<NNNN>/<category>_<NNNN>_OK_C<v>_<time>.jpg
    <root>/realiad_<res>/<category>/NG/<type>/S<NNNN>/<category>_<NNNN>_NG_<type>_C<v>_<time>.jpg
    <root>/realiad_<res>/<category>/NG/<type>/S<NNNN>/<... same stem ...>.png      its mask
    <root>/realiad_jsons/<split set>/<category>.json   (or <root>/<split set>/<category>.json)

``<res>`` is 256, 512, 1024 or raw as released (any ``realiad_<digits>`` folder is read: the
synthetic copy writes ``realiad_32``); of several, the smallest at least ``data.resize`` is read
(the largest when none is). The split sets: ``realiad_jsons`` (every image of every sample: the
5 views C1..C5 of a sample are 5 images of its category; the default) and ``realiad_jsons_sv``
(the single-view setting's split). ``realiad_jsons_fuiad_*`` (the fully-unsupervised setting:
anomalous images inside ``train``) are refused, the trainer assumes a normal training set.

The JSON keys are the release's, as its public readers use them (anomalib
``src/anomalib/data/datasets/image/realiad.py``: ``train``/``test`` lists of entries with
``image_path``, ``mask_path``, ``anomaly_class`` == "OK" for normal, paths relative to
``realiad_<res>/<category>``; other readers of the same files read ``meta.normal_class`` and
``meta.prefix``, the latter the folder under ``realiad_<res>``; the Real-IAD README and
Dinomaly's list the folders ``realiad_1024``, ``realiad_jsons``, ``realiad_jsons_sv``,
``realiad_jsons_fuiad_0.{0,1,2,4}``)::

    {"meta": {"prefix": "<category>", "normal_class": "OK", ...},
     "train": [{"category": "<category>", "anomaly_class": "OK", "image_path": "OK/S0001/...jpg",
                "mask_path": null}, ...],
     "test":  [{..., "anomaly_class": "HS", "image_path": "NG/HS/S0100/...jpg",
                "mask_path": "NG/HS/S0100/...png"}, ...]}

The label is the entry's ``anomaly_class`` (a view of a defective sample in which the defect is
not visible is listed "OK": a normal image, wherever its folder); a defective image's mask is its
entry's ``mask_path``, never found by name or file order. Everything else (checking every file
before anything is written, the content fingerprint, reuse, pruning, leases) is
``mvtec.open_dataset``'s, with MVTec AD's two-split builder. Problems are raised as one
``layout.DatasetError`` naming each JSON file or image and the fix.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

from cras_jax.data import identity, layout, mvtec, mvtec_builder, preprocess
from cras_jax.data import validate as validate_lib

JSON_DIR = "realiad_jsons"
SPLIT_SETS = ("realiad_jsons", "realiad_jsons_sv")  # read; realiad_jsons_fuiad_* refused
DEFAULT_SPLIT_SET = "realiad_jsons"
SPLITS = ("train", "test")  # the JSON's lists, the prepared copy's splits
TOP_KEYS = ("meta", "train", "test")
ENTRY_KEYS = ("image_path", "anomaly_class")  # and mask_path for a defective entry
NORMAL_CLASS = "OK"  # meta.normal_class when the file gives none
_IMAGE_DIR = re.compile(r"realiad_(\d+|raw)$")

EXPECTED_LAYOUT = """\
Expected layout (Real-IAD as released; the JSON split files name every image and mask):
  <root>/realiad_<res>/<category>/OK/S<NNNN>/<name>.jpg         normal samples, 5 views each
  <root>/realiad_<res>/<category>/NG/<type>/S<NNNN>/<name>.jpg  defective samples
  <root>/realiad_<res>/<category>/NG/<type>/S<NNNN>/<name>.png  their masks
  <root>/realiad_jsons/realiad_jsons/<category>.json  {"meta": {...}, "train": [...],
      "test": [...]}, entries {"image_path", "mask_path", "anomaly_class", "category"}
  (<res>: 256, 512, 1024 or raw; the JSON folders may also sit directly under <root>)"""


# --------------------------------------------------------------------------------------------
# Scanning


def image_dirs(root: str | os.PathLike) -> dict[str, Path]:
  """The ``realiad_<res>`` folders of ``root``, by ``<res>``."""
  return {m.group(1): d for d in layout._subdirs(Path(root)) if (m := _IMAGE_DIR.match(d.name))}


def choose_image_dir(root: str | os.PathLike, resize: int | None) -> Path | None:
  """The smallest ``realiad_<res>`` at least ``resize`` pixels (the largest when none is,
  ``realiad_raw`` only when it is the only one); None when there is none."""
  dirs = image_dirs(root)
  sized = sorted((int(r), d) for r, d in dirs.items() if r != "raw")
  if not sized:
    return dirs.get("raw")
  big = [d for r, d in sized if resize is None or r >= resize]
  return big[0] if big else sized[-1][1]


def json_candidates(root: str | os.PathLike, split_set: str, category: str) -> list[Path]:
  """Where the split file of ``category`` may be, in the order looked at."""
  name = f"{category}.json"
  return [Path(root) / JSON_DIR / split_set / name, Path(root) / split_set / name]


def discover_classes(root: str | os.PathLike, split_set: str = DEFAULT_SPLIT_SET) -> list[str]:
  """The categories that have a JSON split file of ``split_set``, sorted."""
  for folder in (Path(root) / JSON_DIR / split_set, Path(root) / split_set):
    if folder.is_dir():
      return sorted(p.stem for p in folder.iterdir() if p.suffix == ".json" and p.is_file())
  return []


def _read_json(path: Path, cls: str, problems: list[str]) -> dict | None:
  """The split file's contents, or None with a problem when it is not a Real-IAD split file."""
  fix = "restore it from the release's realiad_jsons.zip"
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    problems.append(f"class {cls!r}: {os.fspath(path)!r} cannot be read as JSON ({e}); {fix}")
    return None
  missing = [k for k in TOP_KEYS if not isinstance(data, dict) or k not in data]
  if missing:
    problems.append(
        f"class {cls!r}: {os.fspath(path)!r} is not a Real-IAD split file: it lacks the keys "
        f"{', '.join(missing)} (a split file is an object with {', '.join(TOP_KEYS)}); {fix}"
    )
    return None
  meta = data["meta"]
  bad = [k for k in ("train", "test") if not isinstance(data[k], list)]
  if not isinstance(meta, dict) or bad:
    what = "'meta' is not an object" if not isinstance(meta, dict) else f"{bad} not lists"
    problems.append(f"class {cls!r}: {os.fspath(path)!r} is not a Real-IAD split file ({what})")
    return None
  return data


def _entry_records(
    cls: str, path: Path, data: dict, base: Path, problems: list[str], allow_image_level_only: bool
) -> list[layout.Record]:
  """The records of one split file's entries (``base``: ``realiad_<res>/<prefix>``), with a
  problem for each kind of bad entry (all names listed once)."""
  normal = data["meta"].get("normal_class", NORMAL_CLASS)
  records: list[layout.Record] = []
  malformed, unsafe, other, no_mask, abnormal_train = [], [], [], [], []
  missing_images, missing_masks = [], []
  for split in SPLITS:
    for k, e in enumerate(data[split]):
      where = f"{split}[{k}]"
      if not isinstance(e, dict) or any(not isinstance(e.get(key), str) for key in ENTRY_KEYS):
        malformed.append(where)
        continue
      if e.get("category", cls) != cls:
        other.append(f"{where} ({e['category']!r})")
        continue
      rel_image, mask = e["image_path"], e.get("mask_path")
      is_normal = e["anomaly_class"] == normal
      if split == "train" and not is_normal:
        abnormal_train.append(rel_image)
        continue
      rels = [rel_image] + ([mask] if not is_normal and mask else [])
      why = next((w for w in map(layout.relative_path_problem, rels) if w), None)
      if why:
        unsafe.append(f"{where}: {why}")
        continue
      image = layout.confined(base, rel_image)
      if not os.path.isfile(image):
        missing_images.append(rel_image)
        continue
      mask_file = None
      if not is_normal:
        if not mask:
          no_mask.append(rel_image)
        else:
          mask_file = layout.confined(base, mask)
          if not os.path.isfile(mask_file):
            missing_masks.append(mask)
            continue
      defect = "good" if is_normal else e["anomaly_class"]
      records.append(layout.Record(cls, split, defect, image, mask_file))
  p, fmt = os.fspath(path), layout._format_names
  restore = "restore them from the release (or use the split files of the images you have)"
  for items, text in (
      (malformed, f"entries without the string keys {', '.join(ENTRY_KEYS)}: fix or remove them"),
      (unsafe, "entries whose paths could leave the image folder: fix or remove them"),
      (other, "entries of another category: each category has its own split file"),
      (
          abnormal_train,
          f"training entries whose anomaly_class is not {normal!r} (a realiad_jsons_fuiad_* "
          f"file?): the model trains on normal images only; use realiad_jsons or "
          f"realiad_jsons_sv",
      ),
      (missing_images, f"images that are missing under {os.fspath(base)!r}: {restore}"),
      (missing_masks, f"masks that are missing under {os.fspath(base)!r}: {restore}"),
  ):
    if items:
      problems.append(f"class {cls!r}: {p!r} names {text}: {fmt(items)}")
  if no_mask and not allow_image_level_only:
    problems.append(
        f"class {cls!r}: {p!r} names defective images without a mask_path (set "
        f"data.allow_image_level_only=true to keep them without pixel ground truth): "
        f"{fmt(no_mask)}"
    )
  return records


def collect(
    root: str | os.PathLike,
    classes: Sequence[str] | None = None,
    *,
    split_set: str = DEFAULT_SPLIT_SET,
    resize: int | None = None,
    allow_image_level_only: bool = False,
) -> tuple[list[layout.Record], list[str], list[str]]:
  """Scan without raising: ``(records, problems, class_names)``: every entry of each
  category's split file of ``split_set`` a record (split "train" or "test"), in the file's
  order. Files are checked to exist; no image is read."""
  if split_set not in SPLIT_SETS:
    raise ValueError(f"split_set {split_set!r}: one of {SPLIT_SETS}")
  classes, problems, stopped = layout.scan_classes(
      root,
      classes,
      lambda r: discover_classes(r, split_set),
      f"a split file {JSON_DIR}/{split_set}/<category>.json",
  )
  if stopped:
    return [], problems, classes
  image_root = choose_image_dir(root, resize)
  if image_root is None:
    problems.append(
        f"no image folder realiad_<res> (realiad_256, realiad_512, realiad_1024, realiad_raw) in "
        f"{os.fspath(root)!r}: unzip the release's images there"
    )
    return [], problems, classes
  records: list[layout.Record] = []
  for cls in classes:
    paths = [p for p in json_candidates(root, split_set, cls) if p.is_file()]
    if not paths:
      looked = " or ".join(repr(os.fspath(p)) for p in json_candidates(root, split_set, cls))
      problems.append(
          f"class {cls!r}: no split file ({looked}): unzip the release's realiad_jsons.zip in "
          f"{os.fspath(root)!r}, or leave {cls!r} out of data.classes"
      )
      continue
    data = _read_json(paths[0], cls, problems)
    if data is None:
      continue
    prefix = data["meta"].get("prefix") or cls
    why = layout.relative_path_problem(prefix)
    if why:
      problems.append(f"class {cls!r}: {os.fspath(paths[0])!r} has a bad meta.prefix: {why}")
      continue
    base = Path(layout.confined(image_root, prefix))
    if not base.is_dir():
      problems.append(
          f"class {cls!r}: the image folder {os.fspath(base)!r} is missing: unzip the "
          f"category's images from the release into {os.fspath(image_root)!r}"
      )
      continue
    found = _entry_records(cls, paths[0], data, base, problems, allow_image_level_only)
    for split in SPLITS:
      if not any(r.split == split for r in found):
        problems.append(f"class {cls!r}: {os.fspath(paths[0])!r} lists no {split} images")
    records += found
  return records, problems, classes


def format_problems(root: str | os.PathLike, problems: Sequence[str]) -> str:
  return layout.format_problems(root, problems, "Real-IAD dataset", EXPECTED_LAYOUT)


validate = functools.partial(
    validate_lib.validate_layout,
    what="Real-IAD dataset",
    expected_layout=EXPECTED_LAYOUT,
    read_despite_problems=False,
)


def load_dataset(
    root: str | os.PathLike,
    classes: Sequence[str] | None,
    resize: int,
    crop: int,
    cache_dir: str | os.PathLike,
    *,
    split_set: str = DEFAULT_SPLIT_SET,
    num_workers: int | None = None,
    prune_stale: bool = True,
    verbose: bool = True,
    allow_image_level_only: bool = False,
    mask_rule: str = "binarise",
    limits: preprocess.Limits | None = None,
) -> mvtec.Dataset:
  """`mvtec.load_dataset` for Real-IAD's JSON splits: scan ``root`` (one ``DatasetError``
  listing every problem, before anything is read further or written), build or reuse the
  prepared copy (train, test) and open it."""
  records, problems, class_names = collect(
      root,
      classes,
      split_set=split_set,
      resize=resize,
      allow_image_level_only=allow_image_level_only,
  )
  if problems:  # missing files are not hashed: raised here, nothing written
    validate(records, root, problems)
  digests = identity.file_digests(identity.record_paths(records), num_workers)
  config = mvtec_builder.make_config(
      root,
      class_names,
      resize,
      crop,
      records,
      mask_rule,
      digests,
      layout_name=f"real_iad/{split_set}",
  )
  return mvtec.open_dataset(
      config,
      records,
      class_names,
      cache_dir,
      functools.partial(validate, records, root, num_workers=num_workers, limits=limits),
      identity.of_records(records, class_names, root, digests),
      num_workers=num_workers,
      prune_stale=prune_stale,
      verbose=verbose,
      limits=limits,
  )
