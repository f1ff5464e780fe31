"""Dataset validation, run before any preprocessing or cache write.

``validate(records, root)`` opens and fully decodes every image and mask once (PIL ``open`` +
``load``, which catches truncated files; in a thread pool, as decoding releases the GIL) and
raises ONE ``layout.DatasetError`` listing every problem found, followed by the expected layout:

  * an unreadable or truncated image or mask (the file is named);
  * a mask whose size differs from its image's (both sizes named);
  * a defective test image without a mask (unless ``allow_image_level_only``);
  * a mask without an image (a file in ``ground_truth/<type>/`` matching no test image);
  * the layout problems of ``layout.collect`` passed in ``problems`` (missing root or class,
    class without training or test images).

16-bit TIFFs that Pillow cannot decode are checked with tifffile (as ``preprocess`` reads them).
"""

from __future__ import annotations

import concurrent.futures
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cras_jax.data import layout, preprocess

_TIFF_EXTS = (".tif", ".tiff")


def image_size(path: str | os.PathLike, limits: preprocess.Limits | None = None) -> tuple[int, int]:
  """(width, height) of an image file after decoding it fully; ``ValueError`` naming the file
  when it is missing, corrupt, truncated, in an unsupported format or over ``limits``
  (declared pixels, aspect ratio: checked before decoding)."""
  path = os.fspath(path)
  limits = preprocess.Limits() if limits is None else limits
  refused = None
  try:
    with Image.open(path) as im:
      refused = limits.problem(*im.size)
      if refused is None:
        im.load()
        return im.size
  except FileNotFoundError:
    raise ValueError(f"file not found: {path}") from None
  except Image.DecompressionBombError as e:
    refused = f"too large to decode ({e}); raise data.max_image_pixels for such images"
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    err = e
  if refused is not None:
    raise ValueError(f"image file {path} is refused: {refused}")
  if os.path.splitext(path)[1].lower() in _TIFF_EXTS:  # e.g. 16-bit RGB TIFF: tifffile
    try:
      import tifffile  # only for the 16-bit TIFFs Pillow cannot decode

      shape = tifffile.imread(path).shape
      while len(shape) > 3 or (len(shape) == 3 and shape[-1] not in (1, 2, 3, 4)):
        shape = shape[1:]
      return int(shape[1]), int(shape[0])
    except Exception:  # noqa: BLE001 - report Pillow's error below
      pass
  raise ValueError(f"unreadable or truncated file {path} ({type(err).__name__}: {err})")


def mask_value_count(path: str, limits: preprocess.Limits | None = None) -> int:
  """How many distinct values a mask file's samples take (2 for a proper binary mask)."""
  try:
    arr, _ = preprocess.mask_samples(path, limits)
  except preprocess.ImageReadError as e:
    raise ValueError(str(e)) from None
  return len(np.unique(arr))


def layout_names(items: Sequence[str], limit: int = 5) -> str:
  items = list(items)
  return ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def file_problems(
    records: Sequence[layout.Record],
    num_workers: int | None = None,
    limits: preprocess.Limits | None = None,
) -> list[str]:
  """Every image and mask of ``records`` decoded once (`image_size`, in threads): a problem for
  each file that cannot be read and each mask whose size differs from its image's; a warning
  on stderr names the masks that are not two-valued."""
  problems: list[str] = []
  paths = sorted({p for r in records for p in (r.image_path, r.mask_path) if p})
  masks = {r.mask_path for r in records if r.mask_path}
  workers = num_workers or min(32, max(1, os.cpu_count() or 1))
  sizes: dict[str, tuple[int, int]] = {}
  not_binary = []
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    futures = {p: pool.submit(image_size, p, limits) for p in paths}
    values = {p: pool.submit(mask_value_count, p, limits) for p in sorted(masks)}
    for p in paths:  # sorted: a stable message
      try:
        sizes[p] = futures[p].result()
      except ValueError as e:
        problems.append(str(e))
        continue
      if p in values:
        try:
          n = values[p].result()
        except ValueError:
          continue
        if n > 2:
          not_binary.append(f"{p} ({n} values)")
  if not_binary:
    print(
        f"warning: {len(not_binary)} mask(s) are not two-valued (e.g. JPEG noise or "
        f"anti-aliasing): they are scaled to [0, 1] and a pixel is a defect where > 0.5 "
        f"after resizing (data.mask_rule): {layout_names(not_binary)}",
        file=sys.stderr,
        flush=True,
    )
  for r in records:
    if r.mask_path and r.image_path in sizes and r.mask_path in sizes:
      (iw, ih), (mw, mh) = sizes[r.image_path], sizes[r.mask_path]
      if (iw, ih) != (mw, mh):
        problems.append(
            f"mask {r.mask_path} is {mw}x{mh} (WxH) but its image {r.image_path} is {iw}x{ih}"
        )
  return problems


def validate(
    records: Sequence[layout.Record],
    root: str | os.PathLike,
    allow_image_level_only: bool = False,
    *,
    problems: Sequence[str] = (),
    class_names: Sequence[str] | None = None,
    read_images: bool = True,
    num_workers: int | None = None,
    limits: preprocess.Limits | None = None,
) -> None:
  """Raise one ``layout.DatasetError`` listing every problem of the dataset (module docstring).

  ``records`` come from ``layout.collect(..., check_masks=False)`` (defective images without a
  mask have ``mask_path=None``); ``problems`` are the scan's own problems, listed first.
  ``class_names`` (default: the records' classes) are searched for masks without an image.
  ``read_images=False`` checks only the layout.
  """
  problems = list(problems)
  if class_names is None:
    class_names = list(dict.fromkeys(r.class_name for r in records))
  root_p = Path(root)

  if not allow_image_level_only:
    missing: dict[tuple[str, str], list[str]] = {}
    for r in records:
      if r.is_anomaly and r.mask_path is None:
        missing.setdefault((r.class_name, r.defect_type), []).append(Path(r.image_path).name)
    for (cls, dtype), names in missing.items():
      shown = ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")
      gdir = root_p / cls / "ground_truth" / dtype
      problems.append(
          f"class {cls!r}: defective test images without a mask in {os.fspath(gdir)!r} "
          f"(expected <name>_mask.png; or pass allow_image_level_only=True): {shown}"
      )
  problems += layout.orphan_masks(
      records, root_p, [c for c in class_names if (root_p / c).is_dir()]
  )

  if read_images and records:
    problems += file_problems(records, num_workers, limits)
  if problems:
    raise layout.DatasetError(layout.format_problems(root, problems))


def validate_layout(
    records: Sequence[layout.Record],
    root: str | os.PathLike,
    problems: Sequence[str] = (),
    *,
    what: str,
    expected_layout: str,
    read_images: bool = True,
    num_workers: int | None = None,
    limits: preprocess.Limits | None = None,
    read_despite_problems: bool = True,
) -> None:
  """`validate` for a dataset read in its own layout (MVTec AD 2, Real-IAD): one
  ``layout.DatasetError`` naming it (`what`, `expected_layout`) that lists the scan's
  ``problems`` and, with ``read_images``, every unreadable image or mask and every mask whose
  size differs from its image's (`file_problems`; skipped after scan problems unless
  `read_despite_problems`)."""
  problems = list(problems)
  if read_images and records and (read_despite_problems or not problems):
    problems += file_problems(records, num_workers, limits)
  if problems:
    raise layout.DatasetError(layout.format_problems(root, problems, what, expected_layout))
