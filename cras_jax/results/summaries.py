"""What a person watches during and after training: TensorBoard event files and a picture of
the curves, written beside `train_log.jsonl` (which stays the record of a run).

`<workdir>/tensorboard/` gets the training scalars (`train/<metric>`: the loss and its two
terms, `p_true` / `p_fake` the shares of normal / synthetic patches classified right, the
gradient norm, images/s; `lr/adapter`, `lr/disc`), the evaluation metrics per class and their
mean (`eval/<class>/<metric>`) and a few test heatmaps (`heatmaps/<class>`: image | ground
truth | anomaly map). The event files are written here directly (TFRecord framing of
`tensorflow.Event` protocol buffers, `EventWriter`), so neither TensorFlow nor a writer package
(tensorboardX imports torch when it is installed) is loaded; `tensorboard --logdir=<workdir>`
shows them. `write_curves` draws `<workdir>/results/curves.png` from `train_log.jsonl` and the
evaluations in `results/`. In a multi-process run only process 0 writes.
"""

from __future__ import annotations

import glob
import io
import json
import math
import os
import struct
import time

import jax
import numpy as np
from PIL import Image

from cras_jax.base import fileio
from cras_jax.results import render

# ----------------------------------------------------------------------------- event files


def _crc32c_table() -> list[int]:
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    table.append(c)
  return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), the checksum of TFRecord framing."""
  crc = 0xFFFFFFFF
  table = _CRC_TABLE
  for b in data:
    crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    byte, n = n & 0x7F, n >> 7
    out.append(byte | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _bytes_field(number: int, payload: bytes) -> bytes:
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _varint_field(number: int, value: int) -> bytes:
  return _varint(number << 3) + _varint(value)


def scalar_value(tag: str, value: float) -> bytes:
  """A `Summary.Value` with `simple_value` (float32)."""
  return _bytes_field(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", value)


def image_value(tag: str, image: np.ndarray) -> bytes:
  """A `Summary.Value` holding a PNG of an [H, W, 3] uint8 image."""
  png = io.BytesIO()
  Image.fromarray(image).save(png, format="PNG")
  h, w, c = image.shape
  img = (
      _varint_field(1, h)
      + _varint_field(2, w)
      + _varint_field(3, c)
      + _bytes_field(4, png.getvalue())
  )
  return _bytes_field(1, tag.encode()) + _bytes_field(4, img)


def event(step: int, values: list[bytes] = (), file_version: str | None = None) -> bytes:
  """A serialised `Event` (wall_time, step, and a file version or a summary of `values`)."""
  out = _varint(1 << 3 | 1) + struct.pack("<d", time.time()) + _varint_field(2, step)
  if file_version is not None:
    out += _bytes_field(3, file_version.encode())
  if values:
    out += _bytes_field(5, b"".join(_bytes_field(1, v) for v in values))
  return out


class EventWriter:
  """Appends events to a new `events.out.tfevents.*` file in `logdir`, one record at a time
  (each flushed: a killed run keeps every record written so far)."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{time.time():.0f}.cras_jax.{os.getpid()}"
    self.path = os.path.join(logdir, name)
    self._file = open(self.path, "ab")
    self._write(event(0, file_version="brain.Event:2"))

  def _write(self, data: bytes) -> None:
    header = struct.pack("<Q", len(data))
    self._file.write(
        header
        + struct.pack("<I", _masked_crc(header))
        + data
        + struct.pack("<I", _masked_crc(data))
    )
    self._file.flush()

  def scalars(self, step: int, scalars: dict[str, float]) -> None:
    values = [scalar_value(k, float(v)) for k, v in scalars.items() if math.isfinite(float(v))]
    if values:
      self._write(event(step, values))

  def images(self, step: int, images: dict[str, np.ndarray]) -> None:
    if images:
      self._write(event(step, [image_value(k, v) for k, v in images.items()]))

  def close(self) -> None:
    self._file.close()


# ----------------------------------------------------------------------------- a run's summaries


class Summaries:
  """The TensorBoard writer of one run (`for_workdir`); does nothing on processes other than
  0 or when not `enabled` (`config.log.tensorboard=false`)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.writer = (
        EventWriter(os.path.join(workdir, "tensorboard"))
        if enabled and jax.process_index() == 0
        else None
    )

  def train(self, step: int, metrics: dict, learning_rates: dict[str, float]) -> None:
    """A training window's metrics, and the learning rates (name -> constant rate, steps.py)."""
    if self.writer is None:
      return
    scalars = {f"train/{k}": v for k, v in metrics.items()}
    scalars.update({f"lr/{k}": v for k, v in learning_rates.items()})
    self.writer.scalars(step, scalars)

  def evaluation(self, step: int, table: dict, res=None, class_names=(), per_class=1) -> None:
    """Per-class and mean metrics; with `res` (the scored test split), the first `per_class`
    defective images of each class as heatmaps."""
    if self.writer is None:
      return
    self.writer.scalars(
        step, {f"eval/{c}/{k}": v for c, row in table.items() for k, v in row.items()}
    )
    if res is None or per_class <= 0:
      return
    images = {}
    for k, chosen, lo, hi in render.heatmap_choice(res, class_names, per_class, False):
      for j, i in enumerate(chosen):
        panel = render.panel(res["image"][i], res["mask"][i], res["maps"][i], lo, hi)
        images[f"heatmaps/{class_names[k]}" + (f"_{j}" if j else "")] = panel
    self.writer.images(step, images)

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()
      _OPEN.pop(os.path.dirname(self.writer.path), None)
      self.writer = None


_OPEN: dict[str, Summaries] = {}


def for_workdir(workdir: str, enabled: bool = True) -> Summaries:
  """The run's open `Summaries` (one event file per process and run, shared by the train loop
  and evaluation)."""
  key = os.path.join(workdir, "tensorboard")
  if key not in _OPEN or _OPEN[key].writer is None:
    s = Summaries(workdir, enabled)
    if s.writer is None:
      return s
    _OPEN[key] = s
  return _OPEN[key]


# ----------------------------------------------------------------------------- curves.png


def read_train_log(workdir: str) -> list[dict]:
  """`train_log.jsonl`, one entry per step (the last one written where a resumed run
  repeated steps), in step order."""
  by_step = {}
  path = os.path.join(workdir, "train_log.jsonl")
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          e = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
          continue
        by_step[e["step"]] = e
  return [by_step[s] for s in sorted(by_step)]


def evaluation_points(workdir: str, run_id: str | None = None) -> list[tuple[int, float, float]]:
  """(step, mean I-AUROC, mean P-AUROC) of the run's evaluations in results/, by step (with
  `run_id`, only those that run wrote)."""
  points = {}
  for f in glob.glob(os.path.join(workdir, "results", "metrics_*.json")):
    try:
      r = json.load(open(f))
      if run_id is not None and r.get("run_id") != run_id:
        continue
      mean = r["metrics"]["mean"]
      points[int(r["step"])] = (float(mean["i_auroc"]), float(mean["p_auroc"]))
    except (OSError, ValueError, KeyError, TypeError):
      continue
  return [(s, *points[s]) for s in sorted(points)]


def write_curves(workdir: str, run_id: str | None = None) -> str | None:
  """`<workdir>/results/curves.png`: the loss and the shares of patches classified right
  over the steps, with the evaluations' mean I-/P-AUROC (of run `run_id`) as points. -> its
  path."""
  log = read_train_log(workdir)
  if not log or jax.process_index() != 0:
    return None
  import matplotlib  # here only: plotting is needed for this figure alone

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  steps = [e["step"] for e in log]
  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.6))
  for key, label in (("loss", "loss"), ("loss_true", "normal term"), ("loss_fake", "synth. term")):
    if key in log[0]:
      ax0.plot(steps, [e[key] for e in log], label=label, lw=1.2)
  ax0.set_xlabel("step")
  ax0.set_title("training loss", fontsize=10)
  ax0.legend(fontsize=8)
  for key, label in (("p_true", "normal patches right"), ("p_fake", "synthetic patches right")):
    if key in log[0]:
      ax1.plot(steps, [100 * e[key] for e in log], label=label, lw=1.2)
  points = evaluation_points(workdir, run_id)
  if points:
    s, i_auroc, p_auroc = zip(*points)
    ax1.plot(s, [100 * v for v in i_auroc], "o", label="eval: mean I-AUROC")
    ax1.plot(s, [100 * v for v in p_auroc], "s", label="eval: mean P-AUROC")
  ax1.set_xlabel("step")
  ax1.set_ylabel("%")
  ax1.set_title("shares classified right; evaluations", fontsize=10)
  ax1.legend(fontsize=8)
  fig.tight_layout()
  path = os.path.join(workdir, "results", "curves.png")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with fileio.atomic_write(path, "wb") as f:
    fig.savefig(f, format="png", dpi=90)
  plt.close(fig)
  return path
