"""The MVTec layout on disk: the image records, scanning a dataset folder, its problems.

Layout::

    <root>/<class>/train/good/<name>.<ext>
    <root>/<class>/test/good/<name>.<ext>
    <root>/<class>/test/<defect_type>/<name>.<ext>
    <root>/<class>/ground_truth/<defect_type>/<name>_mask.png

BTAD's folders are read as they are: ``train/ok`` and ``test/ok`` hold the normal images,
``test/ko`` the defective ones, ``ground_truth/ko/<name>.png|.bmp`` their masks.

Scanning reads no image: ``collect`` lists the records and the layout problems without raising,
``scan_mvtec`` raises them as one ``DatasetError``; ``validate`` (which decodes every file) and
``mvtec`` (the prepared TFDS dataset) build on both.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from cras_jax.base import errors

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

EXPECTED_LAYOUT = """\
Expected layout (MVTec AD style; image extensions png/jpg/jpeg/bmp/tif/tiff):
  <root>/<class>/train/good/<name>.<ext>                    normal training images
  <root>/<class>/test/good/<name>.<ext>                     normal test images
  <root>/<class>/test/<defect_type>/<name>.<ext>            defective test images
  <root>/<class>/ground_truth/<defect_type>/<name>_mask.png one mask per defective image
  (masks may also be named <name>.<ext> or <name>_mask.<ext>; BTAD's ok/ko folders are
  accepted: train/ok and test/ok are the normal images, ground_truth/ko/<name>.png|bmp)"""


# A class name becomes a folder and file name (results, heatmaps): one path component, no
# leading dot or space, no '..', no separators or control characters.
_NOT_PLAIN = re.compile(r"[/\\:\x00-\x1f]|\.\.|^[. ]|\s$")


def plain_name_problem(name) -> str | None:
  """Why `name` cannot be a class name, or None."""
  if not isinstance(name, str) or not name or _NOT_PLAIN.search(name):
    return (
        f"{name!r} is not a plain name (one folder name: no '/', '\\', ':', '..', control "
        f"characters or leading '.')"
    )
  return None


def relative_path_problem(rel) -> str | None:
  """Why `rel`, a path read from a file's contents and meant to stay under some root, could
  leave that root, or None: it must be relative and every component a plain name (the class
  name rule: no '..', no leading '.', no ':' or control characters), with '/' or '\\' between
  components."""
  if not isinstance(rel, str) or not rel:
    return f"{rel!r} is not a relative path"
  if os.path.isabs(rel) or rel.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", rel):
    return f"{rel!r} is an absolute path; paths in the file must be relative to its root"
  for part in re.split(r"[/\\]", rel):
    if plain_name_problem(part):
      return (
          f"{rel!r} has the component {part!r}, which could leave the root (each component "
          f"must be a plain name: no '..', leading '.', ':' or control characters)"
      )
  return None


def confined(root: str | os.PathLike, rel: str) -> str:
  """`root`/`rel` for a path `rel` read from a file's contents; raises `DatasetError` when
  `rel` could leave `root` (`relative_path_problem`)."""
  why = relative_path_problem(rel)
  if why:
    raise DatasetError(why)
  return os.path.join(os.fspath(root), *re.split(r"[/\\]", rel))


class DatasetError(errors.UserValueError):
  """The dataset folder does not have the expected layout (lists every problem found)."""


@dataclasses.dataclass(frozen=True)
class Record:
  class_name: str
  split: str  # 'train' | 'test'
  defect_type: str  # 'good' or the defect type
  image_path: str
  mask_path: str | None = None

  @property
  def is_anomaly(self) -> bool:
    return self.defect_type != "good"

  @property
  def has_mask(self) -> bool:
    """Pixel ground truth known: a normal image (all zeros) or a defect with its mask."""
    return not self.is_anomaly or self.mask_path is not None


# --------------------------------------------------------------------------------------------
# Scanning


def _is_image(p: Path) -> bool:
  return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS


def _list_images(folder: Path) -> list[Path]:
  if not folder.is_dir():
    return []
  return sorted((p for p in folder.iterdir() if _is_image(p)), key=lambda p: p.name)


def _subdirs(folder: Path) -> list[Path]:
  if not folder.is_dir():
    return []
  return sorted(
      (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
      key=lambda p: p.name,
  )


def _find_mask(gt_files: dict[str, Path], stem: str) -> Path | None:
  """``<stem>_mask.png``; also accepts ``<stem>_mask.<ext>`` and ``<stem>.<ext>`` (VisA
  conversions). ``gt_files`` is keyed by lower-case file name."""
  stem = stem.lower()
  for key in (
      f"{stem}_mask.png",
      *(f"{stem}_mask{e}" for e in IMAGE_EXTENSIONS),
      *(f"{stem}{e}" for e in IMAGE_EXTENSIONS),
  ):
    if key in gt_files:
      return gt_files[key]
  return None


def discover_classes(root: str | os.PathLike) -> list[str]:
  """Sub-folders of ``root`` that contain a ``train`` or ``test`` folder, sorted."""
  return [d.name for d in _subdirs(Path(root)) if (d / "train").is_dir() or (d / "test").is_dir()]


# BTAD names its normal folders ``ok`` (``train/ok``, ``test/ok``) and its defect folder ``ko``.
NORMAL_DIR_NAMES = ("good", "ok")


def _train_dir(cdir: Path) -> Path:
  """``train/good``, or ``train/ok`` (BTAD) when only that one exists."""
  for name in NORMAL_DIR_NAMES:
    if (cdir / "train" / name).is_dir():
      return cdir / "train" / name
  return cdir / "train" / "good"


def _format_names(names: Sequence[str], limit: int = 5) -> str:
  names = list(names)
  return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def orphan_masks(
    records: Sequence[Record],
    root: str | os.PathLike,
    class_names: Sequence[str],
    *,
    ground_truth: str = "ground_truth",
    test_images: str = "test/{}/<name>.<ext>",
) -> list[str]:
  """Problems for files in ``<class>/<ground_truth>/<type>/`` that belong to no test image
  (``test_images``: where their images are expected, ``{}`` the type)."""
  used = {os.path.normcase(os.path.abspath(r.mask_path)) for r in records if r.mask_path}
  problems = []
  for cls in class_names:
    for gdir in _subdirs(Path(root) / cls / ground_truth):
      orphans = [
          p.name for p in _list_images(gdir) if os.path.normcase(os.path.abspath(p)) not in used
      ]
      if orphans:
        problems.append(
            f"class {cls!r}: masks without a matching test image in "
            f"{os.fspath(gdir)!r} (expected {test_images.format(gdir.name)}): "
            f"{_format_names(orphans)}"
        )
  return problems


def scan_classes(
    root: str | os.PathLike,
    classes: Sequence[str] | None,
    discover: Callable[[Path], list[str]],
    holding: str,
) -> tuple[list[str], list[str], bool]:
  """The classes a scan of ``root`` reads: ``(classes, problems, stopped)``.

  ``classes`` default to ``discover(root)`` (``holding``: what a class folder holds, for the
  problem when none is found); classes listed twice are a problem. The scan stops
  (``stopped``, with only the problems that stop it) at a missing root or a class name that
  is not a plain folder name.
  """
  root_p = Path(root)
  if not root_p.is_dir():
    return [], [f"dataset root {os.fspath(root)!r} does not exist or is not a folder"], True
  problems: list[str] = []
  if classes is None:
    classes = discover(root_p)
    if not classes:
      problems.append(f"no class folders (sub-folders with {holding}) found in {os.fspath(root)!r}")
  else:
    classes = list(classes)
    dup = sorted({c for c in classes if classes.count(c) > 1})
    if dup:
      problems.append(f"classes listed more than once: {', '.join(dup)}")
  bad = [why for why in map(plain_name_problem, classes) if why]
  if bad:  # a class name is a path: '../x' would write outside the workdir
    return list(classes), [f"class names must be plain folder names: {why}" for why in bad], True
  return list(classes), problems, False


def defective_records(
    cls: str, defect_type: str, images: Sequence[Path], gdir: Path
) -> tuple[list[Record], list[str]]:
  """The test records of a class's defective ``images``, each with its mask in ``gdir``
  (`_find_mask`; ``mask_path=None`` when there is none), and the names of those without one."""
  gt_files = {p.name.lower(): p for p in _list_images(gdir)}
  records, missing = [], []
  for p in images:
    m = _find_mask(gt_files, p.stem)
    if m is None:
      missing.append(p.name)
    records.append(
        Record(cls, "test", defect_type, os.fspath(p), None if m is None else os.fspath(m))
    )
  return records, missing


def collect(
    root: str | os.PathLike, classes: Sequence[str] | None = None, *, check_masks: bool = True
) -> tuple[list[Record], list[str], list[str]]:
  """Scan without raising: ``(records, problems, class_names)``.

  Defective test images without a mask get ``mask_path=None``; with ``check_masks`` they,
  and masks that belong to no test image, are listed among the problems. A missing root is
  the only problem that stops the scan (reported alone).
  """
  classes, problems, stopped = scan_classes(root, classes, discover_classes, "train/ or test/")
  if stopped:
    return [], problems, classes
  root_p = Path(root)
  records: list[Record] = []
  for cls in classes:
    cdir = root_p / cls
    if not cdir.is_dir():
      problems.append(f"class {cls!r}: folder {os.fspath(cdir)!r} is missing")
      continue
    tr_dir = _train_dir(cdir)
    train = _list_images(tr_dir)
    if not train:
      problems.append(f"class {cls!r}: no training images in {os.fspath(tr_dir)!r}")
    records += [Record(cls, "train", "good", os.fspath(p)) for p in train]
    n_test = 0
    for tdir in _subdirs(cdir / "test"):
      images = _list_images(tdir)
      n_test += len(images)
      if tdir.name in NORMAL_DIR_NAMES:
        records += [Record(cls, "test", "good", os.fspath(p)) for p in images]
        continue
      gdir = cdir / "ground_truth" / tdir.name
      defective, missing = defective_records(cls, tdir.name, images, gdir)
      records += defective
      if missing and check_masks:
        problems.append(
            f"class {cls!r}: defective test images without a mask in "
            f"{os.fspath(gdir)!r} (expected <name>_mask.png): {_format_names(missing)}"
        )
    if n_test == 0:
      problems.append(f"class {cls!r}: no test images in {os.fspath(cdir / 'test')!r}")
  if check_masks:
    problems += orphan_masks(records, root_p, [c for c in classes if (root_p / c).is_dir()])
  return records, problems, list(classes)


def format_problems(
    root: str | os.PathLike,
    problems: Sequence[str],
    what: str = "Dataset",
    expected_layout: str = EXPECTED_LAYOUT,
) -> str:
  """The message of a `DatasetError`: ``what`` at ``root`` with its problems, one a line, and
  the layout it should have."""
  return (
      f"{what} at {os.fspath(root)!r} has {len(problems)} problem(s):\n"
      + "\n".join(f"  - {p}" for p in problems)
      + "\n"
      + expected_layout
  )


def scan_mvtec(root: str | os.PathLike, classes: Sequence[str] | None = None) -> list[Record]:
  """List the images of an MVTec-layout dataset (no image is read).

  Records come class by class (in ``classes`` order, or sorted when discovered), the train
  split before the test split, defect types and files sorted by name. Raises one
  ``DatasetError`` listing every layout problem found (missing root / class, no training or
  test images, defective images without a mask, masks without an image).
  """
  if not Path(root).is_dir():
    raise DatasetError(
        f"Dataset root {os.fspath(root)!r} does not exist or is not a folder.\n" + EXPECTED_LAYOUT
    )
  records, problems, _ = collect(root, classes, check_masks=True)
  if problems:
    raise DatasetError(format_problems(root, problems))
  return records
