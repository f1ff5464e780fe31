"""MVTec AD 2 read as released, with its validation split kept as a third prepared split.

Layout (``EXPECTED_LAYOUT``; anomalib's ``make_mvtec2_dataset`` and MVTec's own public
``mvtec_ad_2_public_offline.py`` read the same folders)::

    <root>/<class>/train/good/<name>.png                         normal, training
    <root>/<class>/validation/good/<name>.png                    normal, thresholds only
    <root>/<class>/test_public/good/<name>.png                   normal, evaluated
    <root>/<class>/test_public/bad/<name>.png                    defective, evaluated
    <root>/<class>/test_public/ground_truth/bad/<name>_mask.png  their masks
    <root>/<class>/test_private/<name>.png                       images only (submission)
    <root>/<class>/test_private_mixed/<name>.png                 images only (submission)

The prepared (TFDS) copy holds three splits, each image resized and centre-cropped once by the
same function as every other dataset's (``preprocess.load_example``): ``train`` (train/good),
``validation`` (validation/good: normal images the thresholds are fitted on, never the test
set) and ``test`` (test_public, with masks). Everything else (validation of every file before
anything is written, the content fingerprint in the prepared copy's name, reuse, pruning,
leases) is ``mvtec.load_dataset``'s; the builder is ``MVTecAD2Folder``, a ``MVTecFolder`` with
the extra split. The private test sets are not prepared: ``private_images`` lists them for the
submission command (``scoring/submission.py``), which reads them at their original size.

Problems are raised as one ``layout.DatasetError`` naming every file or folder and its fix: a
class without ``validation/good`` (the thresholds need it), defective images without masks,
masks without images, unreadable files, masks or sub-folders inside ``test_private*`` (no
ground truth is released for them).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from pathlib import Path

import tensorflow_datasets as tfds

from cras_jax.data import identity, layout, mvtec, mvtec_builder, preprocess
from cras_jax.data import validate as validate_lib

# prepared split -> the release's folder
SPLIT_DIRS = {"train": "train", "validation": "validation", "test": "test_public"}
SPLITS = tuple(SPLIT_DIRS)
PRIVATE_SPLITS = ("test_private", "test_private_mixed")
GROUND_TRUTH = "ground_truth"

EXPECTED_LAYOUT = """\
Expected layout (MVTec AD 2 as released; image extensions png/jpg/jpeg/bmp/tif/tiff):
  <root>/<class>/train/good/<name>.png                         normal training images
  <root>/<class>/validation/good/<name>.png                    normal images for the thresholds
  <root>/<class>/test_public/good/<name>.png                   normal test images
  <root>/<class>/test_public/bad/<name>.png                    defective test images
  <root>/<class>/test_public/ground_truth/bad/<name>_mask.png  one mask per defective image
  <root>/<class>/test_private/<name>.png                        images only, no ground truth
  <root>/<class>/test_private_mixed/<name>.png                  images only, no ground truth"""


# --------------------------------------------------------------------------------------------
# Scanning


def discover_classes(root: str | os.PathLike) -> list[str]:
  """Sub-folders of ``root`` holding ``train/``, ``validation/`` or ``test_public/``, sorted."""
  return [
      d.name
      for d in layout._subdirs(Path(root))
      if any((d / s).is_dir() for s in SPLIT_DIRS.values())
  ]


def _normal_images(cls: str, folder: Path, what: str, problems: list[str], fix: str) -> list:
  images = layout._list_images(folder)
  if not images:
    state = "is empty" if folder.is_dir() else "is missing"
    problems.append(f"class {cls!r}: {what} {os.fspath(folder)!r} {state}; {fix}")
  return images


def private_problems(cdir: Path, cls: str) -> list[str]:
  """Mask files or folders inside a class's ``test_private*`` folders (MVTec AD 2 releases
  none for them: such files mean a test_public folder was copied there, or masks were mixed
  in), one problem each naming the files and the fix."""
  problems = []
  for split in PRIVATE_SPLITS:
    d = cdir / split
    if d.exists() and not d.is_dir():
      problems.append(f"class {cls!r}: {os.fspath(d)!r} is a file, not a folder of images")
      continue
    for sub in layout._subdirs(d):
      problems.append(
          f"class {cls!r}: {os.fspath(sub)!r} is a folder inside {split}/, which holds images "
          f"only (MVTec AD 2 releases no ground truth for {split}): move it out of "
          f"{os.fspath(d)!r}"
      )
    masks = [p.name for p in layout._list_images(d) if p.stem.lower().endswith("_mask")]
    if masks:
      problems.append(
          f"class {cls!r}: {split}/ holds mask files in {os.fspath(d)!r}: "
          f"{layout._format_names(masks)}. MVTec AD 2 releases no ground truth for {split} "
          f"(masks of test_public belong in test_public/{GROUND_TRUTH}/bad/): move or delete them"
      )
  return problems


def collect(
    root: str | os.PathLike,
    classes: Sequence[str] | None = None,
    *,
    allow_image_level_only: bool = False,
) -> tuple[list[layout.Record], list[str], list[str]]:
  """Scan without raising: ``(records, problems, class_names)``. Records have split "train",
  "validation" or "test" (test_public); defective ones without a mask get ``mask_path=None``
  (a problem unless ``allow_image_level_only``). No image is read."""
  classes, problems, stopped = layout.scan_classes(
      root, classes, discover_classes, "train/, validation/ or test_public/"
  )
  if stopped:
    return [], problems, classes
  root_p = Path(root)
  records: list[layout.Record] = []
  for cls in classes:
    cdir = root_p / cls
    if not cdir.is_dir():
      problems.append(f"class {cls!r}: folder {os.fspath(cdir)!r} is missing")
      continue
    train = _normal_images(
        cls, cdir / "train" / "good", "the training folder", problems, "the model trains on it"
    )
    records += [layout.Record(cls, "train", "good", os.fspath(p)) for p in train]
    val = _normal_images(
        cls,
        cdir / "validation" / "good",
        "the validation folder",
        problems,
        "MVTec AD 2's thresholds are fitted on its normal validation images (never on the test "
        "set): restore validation/good from the release (or put normal images that are not "
        "used for training there)",
    )
    records += [layout.Record(cls, "validation", "good", os.fspath(p)) for p in val]
    tdir = cdir / "test_public"
    n_test = 0
    for sub in layout._subdirs(tdir):
      if sub.name == GROUND_TRUTH:
        continue
      images = layout._list_images(sub)
      n_test += len(images)
      if sub.name in layout.NORMAL_DIR_NAMES:
        records += [layout.Record(cls, "test", "good", os.fspath(p)) for p in images]
        continue
      gdir = tdir / GROUND_TRUTH / sub.name
      defective, missing = layout.defective_records(cls, sub.name, images, gdir)
      records += defective
      if missing and not allow_image_level_only:
        problems.append(
            f"class {cls!r}: defective test images without a mask in {os.fspath(gdir)!r} "
            f"(expected <name>_mask.png; or set data.allow_image_level_only=true): "
            f"{layout._format_names(missing)}"
        )
    if n_test == 0:
      problems.append(f"class {cls!r}: no test images in {os.fspath(tdir)!r} (good/, bad/)")
    problems += layout.orphan_masks(
        records,
        root_p,
        [cls],
        ground_truth=f"test_public/{GROUND_TRUTH}",
        test_images="test_public/{}/<name>.png",
    )
    problems += private_problems(cdir, cls)
  return records, problems, classes


def format_problems(root: str | os.PathLike, problems: Sequence[str]) -> str:
  return layout.format_problems(root, problems, "MVTec AD 2 dataset", EXPECTED_LAYOUT)


validate = functools.partial(
    validate_lib.validate_layout, what="MVTec AD 2 dataset", expected_layout=EXPECTED_LAYOUT
)


def private_images(root: str | os.PathLike, cls: str, split: str) -> list[Path]:
  """The images of ``<root>/<cls>/<split>/`` (a private test set), sorted by name; a
  ``DatasetError`` naming the folder when it is missing or holds masks or folders."""
  if split not in PRIVATE_SPLITS:
    raise ValueError(f"split {split!r}: one of {PRIVATE_SPLITS}")
  cdir = Path(root) / cls
  folder = cdir / split
  problems = private_problems(cdir, cls)
  if not folder.is_dir():
    problems.append(
        f"class {cls!r}: {os.fspath(folder)!r} is missing: the submission scores MVTec AD 2's "
        f"{split} images; point --data_root (or the run's data.root) at the full release"
    )
  elif not layout._list_images(folder):
    problems.append(f"class {cls!r}: {os.fspath(folder)!r} holds no images")
  if problems:
    raise layout.DatasetError(format_problems(root, problems))
  return layout._list_images(folder)


# --------------------------------------------------------------------------------------------
# The prepared copy: three splits


class MVTecAD2Folder(mvtec_builder.MVTecFolder, skip_registration=True):
  """`MVTecFolder` with MVTec AD 2's three splits: train, validation, test (test_public)."""

  name = "mvtec_ad2_folder"

  def _log_download_bytes(self) -> None:
    n = {s: len(self._split_records(s)) for s in SPLITS}
    cfg = self.builder_config
    print(
        f"preparing MVTec AD 2 ({n['train']} train, {n['validation']} validation, "
        f"{n['test']} test_public images; resize {cfg.resize}, crop {cfg.crop}; once, reused "
        f"by later runs)",
        flush=True,
    )

  def _info(self) -> tfds.core.DatasetInfo:
    info = super()._info()  # train and test; the validation split's metadata added here
    cfg = self.builder_config
    info.metadata["splits"]["validation"] = mvtec_builder._split_metadata(
        self._split_records("validation"), cfg.class_names, cfg.root
    )
    return info

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {s: self._generate_examples(split=s) for s in SPLITS}


@dataclasses.dataclass
class Dataset(mvtec.Dataset):
  """`mvtec.Dataset` with the validation split (normal images only)."""

  validation: object | None = None

  def summary_lines(self) -> list[str]:
    lines = super().summary_lines()
    for k, cls in enumerate(self.class_names):
      n = sum(r.split == "validation" and r.class_name == cls for r in self.records)
      lines[k] = lines[k].replace(" | test good", f" | validation {n} | test_public good", 1)
    return lines


def _identity(records, class_names, root, digests) -> dict:
  """`identity.of_records` with the validation split's entry too."""
  out = identity.of_records(records, class_names, root, digests)
  val = [dataclasses.replace(r, split="train") for r in records if r.split == "validation"]
  out["validation"] = identity.of_records(val, class_names, root, digests)["train"]
  return out


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
  """`mvtec.load_dataset` for MVTec AD 2's own layout: scan and validate ``root`` (one
  ``DatasetError`` listing every problem, before anything is written), build or reuse the
  prepared copy with its train, validation and test splits, and open it."""
  records, problems, class_names = collect(
      root, classes, allow_image_level_only=allow_image_level_only
  )
  if problems and not records:
    validate(records, root, problems)
  digests = identity.file_digests(identity.record_paths(records), num_workers)
  config = mvtec_builder.make_config(
      root, class_names, resize, crop, records, mask_rule, digests, layout_name="mvtec_ad2"
  )
  return mvtec.open_dataset(
      config,
      records,
      class_names,
      cache_dir,
      functools.partial(validate, records, root, problems, num_workers=num_workers, limits=limits),
      _identity(records, class_names, root, digests),
      builder_cls=MVTecAD2Folder,
      dataset_cls=Dataset,
      splits=SPLITS,
      num_workers=num_workers,
      prune_stale=prune_stale,
      verbose=verbose,
      limits=limits,
  )
