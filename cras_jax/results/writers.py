"""The files of a prediction (`scoring.predicting`), all written here, under one output folder:
results.csv and results.json (one row per input image), masks/<stem>.png (0/255),
overlays/<stem>.png (`render.overlay`), and on request maps.npz (raw maps and matched
classes) and a .npy file of the preprocessed crops.

Rows are appended to results.csv.partial (flushed per row) while scoring; results.csv and
results.json are written at the end and renamed into place, so a run that fails late keeps its
rows. A partial file left by a predict that was stopped or killed (kill -9 runs no handler)
is kept as results.interrupted-<time>.csv by the next predict into the folder, which says so;
one that a running predict holds (its lock) means that predict writes into the same folder:
refused. PNGs are written by two threads beside the scoring.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence

import numpy as np
from PIL import Image

from cras_jax.base import csv_cells, errors, fileio, fs, jsonio
from cras_jax.results import render

OVERLAY_ALPHA = 0.45
PARTIAL_CSV = "results.csv.partial"
CSV_FIELDS = (
    "name",
    "path",
    "score",
    "normalised_score",
    "matched_class",
    "anomalous",
    "defect_fraction",
    "mask",
    "overlay",
    "error",
)


def csv_cell(v):
  """A CSV cell: floats with 6 decimals (empty when not finite), None empty."""
  if isinstance(v, float):
    return "" if not math.isfinite(v) else f"{v:.6f}"
  return "" if v is None else v


def write_png(path: str, array: np.ndarray) -> None:
  with fileio.atomic_write(path, "wb") as f:
    Image.fromarray(array).save(f, format="PNG")


def write_overlay(path: str, image, zmap, mask, lo: float, hi: float) -> None:
  write_png(path, render.overlay(image, zmap, lo, hi, OVERLAY_ALPHA, mask))


def claim_partial(path: str):
  """The partial-rows file, opened for writing and locked for this process's life. Rows left
  in it by a predict that did not finish are first kept beside it (and reported); a lock
  held by a live predict is a `UserValueError` (two predicts into one folder)."""
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not truncated before the lock is ours
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    os.close(fd)
    raise errors.UserValueError(
        f"another predict is writing into {os.path.dirname(path)} now ({PARTIAL_CSV} is "
        f"locked): wait for it to finish, or give this one another --output_dir"
    ) from None
  with open(path, newline="") as f:
    rows = max(sum(1 for _ in f) - 1, 0)  # the header is not a row
  if rows:
    stem = os.path.join(
        os.path.dirname(path), f"results.interrupted-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    kept, n = f"{stem}.csv", 1
    while os.path.exists(kept):  # never over an earlier one
      kept, n = f"{stem}-{n}.csv", n + 1
    shutil.copyfile(path, kept)
    print(
        f"note: an earlier predict into this folder did not finish (stopped or killed); the "
        f"{rows} row(s) it had scored are kept in {kept}",
        file=sys.stderr,
        flush=True,
    )
  os.ftruncate(fd, 0)
  return os.fdopen(fd, "w", newline="")


class PredictionWriter:
  """Writes one prediction's files into `output_dir` as its records arrive (`add`), and the
  results at the end (`finish`). colour_range: the overlays' [lo, hi]."""

  def __init__(
      self,
      output_dir: str,
      colour_range: tuple[float, float],
      masks: bool = True,
      overlays: bool = True,
      save_maps: bool = False,
      save_crops: str | None = None,
  ):
    self.output_dir, self.colour_range = output_dir, colour_range
    self.masks, self.overlays = masks, overlays
    self.save_maps, self.save_crops = save_maps, save_crops
    fs.writable_dir(output_dir, "the output folder (--output_dir)", "give a writable folder")
    for sub, on in (("masks", masks), ("overlays", overlays)):
      if on:
        os.makedirs(os.path.join(output_dir, sub), exist_ok=True)
    self.kept_maps, self.kept_crops = {}, {}
    self._pool = concurrent.futures.ThreadPoolExecutor(2)
    self._writes = []
    # Rows whose PNGs are still being written: recorded in the partial CSV once their files
    # exist (in order), so a stopped run lists only files that exist.
    self._waiting: list[tuple[dict, list]] = []
    self.partial_path = os.path.join(output_dir, PARTIAL_CSV)
    self._partial = claim_partial(self.partial_path)
    self._partial_csv = csv_cells.writer(self._partial)
    self._partial_csv.writerow(CSV_FIELDS)

  def _path(self, *parts: str) -> str:
    return os.path.join(self.output_dir, *parts)

  def row(self, row: dict) -> None:
    """A row on disk as soon as it is known (results.csv.partial)."""
    self._partial_csv.writerow([csv_cell(row.get(k)) for k in CSV_FIELDS])
    self._partial.flush()

  def add(self, record, stem: str) -> None:
    """A scored image (`predicting.Record`): its mask and overlay PNGs (named `stem`, paths
    set in its row), its row, and its map and crop when kept."""
    row = record.row
    n_writes = len(self._writes)
    if self.masks and record.mask is not None:
      row["mask"] = os.path.join("masks", stem + ".png")
      mask_png = record.mask.astype(np.uint8) * 255
      self._writes.append(self._pool.submit(write_png, self._path(row["mask"]), mask_png))
    if self.overlays:
      row["overlay"] = os.path.join("overlays", stem + ".png")
      self._writes.append(
          self._pool.submit(
              write_overlay,
              self._path(row["overlay"]),
              record.image,
              record.zmap,
              record.mask,
              *self.colour_range,
          )
      )
    self._waiting.append((row, self._writes[n_writes:]))
    self._record_written()
    if self.save_maps:
      self.kept_maps[record.index] = (record.raw_map, record.cls)
    if self.save_crops:
      self.kept_crops[record.index] = record.image

  def _record_written(self, block: bool = False) -> None:
    while self._waiting and (block or all(f.done() for f in self._waiting[0][1])):
      row, futures = self._waiting.pop(0)
      for f in futures:
        f.result()
      self.row(row)

  def wait(self) -> None:
    """Until every PNG is written (raises the first write's error); every row recorded."""
    self._record_written(block=True)
    for w in self._writes:
      w.result()

  def close(self, failed: bool = False) -> None:
    """Stops the PNG threads and closes the partial rows; failed: says where they are."""
    self._pool.shutdown()  # the PNGs already queued are completed
    for row, futures in self._waiting:  # rows whose files all exist now are listed
      if all(f.exception() is None for f in futures):
        self.row(row)
    self._waiting = []
    self._partial.close()
    if failed:
      print(
          f"\nscoring stopped; the rows scored so far are in {self.partial_path}",
          file=sys.stderr,
          flush=True,
      )

  def finish(self, rows: Sequence[dict], summary: dict, names: Sequence[str]) -> None:
    """results.csv and results.json (both complete, then renamed into place, then the
    partial rows dropped), maps.npz and the crops."""
    csv_path, json_path = self._path("results.csv"), self._path("results.json")
    # Both written to temporaries (`fileio.atomic_write`) and renamed into place only when
    # both are complete: a failure leaves neither.
    with (
        fileio.atomic_write(csv_path, "w", newline="") as fc,
        fileio.atomic_write(json_path, "w") as fj,
    ):
      w = csv_cells.writer(fc)
      w.writerow(CSV_FIELDS)
      for r in rows:
        w.writerow([csv_cell(r.get(k)) for k in CSV_FIELDS])
      json.dump(jsonio.json_safe(summary), fj, indent=2)
    os.remove(self.partial_path)
    order = sorted(self.kept_maps)
    if self.save_maps and order:
      with fileio.atomic_write(self._path("maps.npz"), "wb") as f:
        np.savez(
            f,
            names=np.asarray([names[i] for i in order]),
            maps=np.stack([self.kept_maps[i][0] for i in order]),
            cls=np.asarray([self.kept_maps[i][1] for i in order], np.int32),
        )
    if self.save_crops and self.kept_crops:
      crops = self.save_crops
      crops += "" if crops.endswith(".npy") else ".npy"  # the name np.save gives a path
      with fileio.atomic_write(crops, "wb") as f:
        np.save(f, np.stack([self.kept_crops[i] for i in sorted(self.kept_crops)]))
