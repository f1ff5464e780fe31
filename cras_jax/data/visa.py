"""VisA's original release converted to the MVTec layout.

Input (as released)::

    <visa>/<class>/Data/Images/{Normal,Anomaly}/<name>.JPG
    <visa>/<class>/Data/Masks/Anomaly/<name>.png
    <visa>/split_csv/1cls.csv    columns: object,split,label,image,mask (paths relative to <visa>)

Output::

    <out>/<class>/train/good/<name>.JPG
    <out>/<class>/test/good/<name>.JPG
    <out>/<class>/test/bad/<name>.JPG
    <out>/<class>/ground_truth/bad/<name>_mask.png      binarised: > 0 -> 255

Images are copied byte for byte (with their mtime); masks are rewritten as 8-bit PNGs. Running
it again skips every output that is already up to date (idempotent), so an interrupted
conversion can simply be restarted. Used after a download (`data.fetch`) and by hand
(`python -m tools.convert_visa <visa> <out>`).
"""

from __future__ import annotations

import csv
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from cras_jax.base import errors
from cras_jax.data import layout

SPLIT_CSV = os.path.join("split_csv", "1cls.csv")
COLUMNS = ("object", "split", "label", "image", "mask")


class ConversionError(errors.UserValueError):
  """The split file or the sources cannot be converted (lists every problem)."""


def read_split(csv_path: Path) -> list[dict]:
  with open(csv_path, newline="") as f:
    reader = csv.DictReader(f)
    fields = [c.strip().lower() for c in (reader.fieldnames or [])]
    missing = [c for c in COLUMNS if c not in fields]
    if missing:
      raise ConversionError(
          f"{csv_path}: missing column(s) {', '.join(missing)}; expected {','.join(COLUMNS)}"
      )
    return [{k.strip().lower(): (v or "").strip() for k, v in row.items() if k} for row in reader]


def _up_to_date(src: Path, dst: Path) -> bool:
  return dst.is_file() and dst.stat().st_mtime_ns >= src.stat().st_mtime_ns


def _copy(src: Path, dst: Path) -> bool:
  if dst.is_file():
    s, d = src.stat(), dst.stat()
    if s.st_size == d.st_size and s.st_mtime_ns == d.st_mtime_ns:
      return False
  tmp = dst.with_name(dst.name + ".tmp")
  shutil.copy2(src, tmp)
  os.replace(tmp, dst)
  return True


def _write_mask(src: Path, dst: Path) -> bool:
  if _up_to_date(src, dst):
    return False
  with Image.open(src) as im:
    im.load()
    if im.mode in ("1", "L", "I", "F") or im.mode.startswith("I;16"):
      arr = np.asarray(im)
    else:  # palette / RGB(A): any non-black colour is a defect, alpha ignored
      arr = np.asarray(im.convert("RGB")).max(axis=-1)
  out = np.where(arr > 0, 255, 0).astype(np.uint8)
  tmp = dst.with_name(dst.name + ".tmp")
  Image.fromarray(out, mode="L").save(tmp, format="PNG")
  os.replace(tmp, dst)
  return True


def convert(
    visa_root: str | os.PathLike,
    out_root: str | os.PathLike,
    classes: Sequence[str] | None = None,
    split_csv: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, int]:
  """Convert; returns counts {'written': n, 'skipped': n}. Raises ``ConversionError`` listing
  every missing source file (nothing is written then)."""
  visa_root, out_root = Path(visa_root), Path(out_root)
  csv_path = Path(split_csv) if split_csv else visa_root / SPLIT_CSV
  if not csv_path.is_file():
    raise ConversionError(f"split file {csv_path} not found (expected <visa>/{SPLIT_CSV})")
  rows = read_split(csv_path)
  if classes:
    unknown = sorted(set(classes) - {r["object"] for r in rows})
    if unknown:
      raise ConversionError(f"classes not in {csv_path}: {', '.join(unknown)}")
    rows = [r for r in rows if r["object"] in set(classes)]

  jobs = []  # (kind, src, dst)
  problems = []
  for r in rows:
    cls, split, label = r["object"], r["split"].lower(), r["label"].lower()
    # Every path built from the CSV stays under its root (the class-name rule per component).
    why = [
        f"{col} {w}"
        for col, w in (
            ("object", layout.plain_name_problem(cls)),
            ("image", layout.relative_path_problem(r["image"])),
            ("mask", r.get("mask") and layout.relative_path_problem(r["mask"])),
        )
        if w
    ]
    if why:
      problems.append(f"{csv_path}: row refused: " + "; ".join(why))
      continue
    img = Path(layout.confined(visa_root, r["image"]))
    anomaly = label not in ("normal", "good", "0")
    if split not in ("train", "test"):
      problems.append(f"{r['image']}: unknown split {r['split']!r}")
      continue
    if split == "train" and anomaly:
      problems.append(f"{r['image']}: anomalous image in the train split")
      continue
    kind = "bad" if anomaly else "good"
    if not img.is_file():
      problems.append(f"image not found: {img}")
      continue
    jobs.append(("image", img, out_root / cls / split / kind / img.name))
    if anomaly:
      if not r.get("mask"):
        problems.append(f"{r['image']}: anomalous image without a mask in the CSV")
        continue
      mask = Path(layout.confined(visa_root, r["mask"]))
      if not mask.is_file():
        problems.append(f"mask not found: {mask}")
        continue
      jobs.append(("mask", mask, out_root / cls / "ground_truth" / "bad" / f"{img.stem}_mask.png"))
  if problems:
    shown = problems[:20] + ([f"... ({len(problems)} in all)"] if len(problems) > 20 else [])
    raise ConversionError(
        f"VisA at {visa_root}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in shown)
    )

  counts = {"written": 0, "skipped": 0}
  total = len(jobs)
  step = max(1, total // 20)
  for i, (kind, src, dst) in enumerate(jobs, 1):
    dst.parent.mkdir(parents=True, exist_ok=True)
    wrote = _copy(src, dst) if kind == "image" else _write_mask(src, dst)
    counts["written" if wrote else "skipped"] += 1
    if i % step == 0 or i == total:
      log(
          f"[{i}/{total}] {i * 100 // max(total, 1)}% ({counts['written']} written, "
          f"{counts['skipped']} up to date)"
      )
  log(
      f"done: {total} files in {out_root} ({counts['written']} written, "
      f"{counts['skipped']} already up to date)"
  )
  return counts
