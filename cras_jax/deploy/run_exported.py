"""Scores images with a model exported by `python -m cras_jax.export`, using only jax and numpy.

    python cras_jax/run_exported.py model.npz crops.npy [--batch_size=16] [--output=scores.npz]
        [--image_threshold=Z] [--pixel_threshold=Z]

crops.npy: uint8 [N, crop, crop, 3] RGB images already preprocessed as the model's input
(`meta["input"]` of the file: resize the shorter side with bilinear interpolation, centre crop).
Decoding and resizing image files needs an image library, which this script does not import;
`python -m cras_jax.predict --workdir=<run> --save_crops=crops.npy <images>` writes such a
file. Prints one line per image and, with --output, saves every output of the function
(scores, maps, patch, cls, normalised_scores, is_anomaly, masks) as arrays of N rows.

From Python: `model = load("model.npz"); out = score(model, crops, batch_size=16)`.

Loading verifies the file's content checksum (`content_checksum`: SHA-256 over the serialised
function, every weight array and the meta) before anything in it is used: a file changed after
export, even one weight scaled or one byte of the function, is refused (exit status 2).
"""

import argparse
import hashlib
import json
import sys
import zipfile

import jax
import numpy as np
from jax import export

from cras_jax.deploy.outputs import (
    check_output,
    print_results,
    save_outputs,
)


class ExportError(ValueError):
  """The exported file or its inputs cannot be used (the message names the file)."""


CHECKSUM_COVERS = (
    "sha256 over the serialised function, every weight array (index, dtype, shape, bytes) "
    "and the meta without this entry (JSON, sorted keys)"
)


def content_checksum(exported, weights, meta):
  """SHA-256 (hex) of an export's contents: `exported` (the serialised function's bytes),
  `weights` (arrays, in order) and `meta` (its "checksum" entry left out)."""
  h = hashlib.sha256()

  def part(tag, data):
    data = memoryview(data).cast("B")
    h.update(f"{tag}\0{data.nbytes}\0".encode())
    h.update(data)

  part("exported", bytes(exported))
  for i, w in enumerate(weights):
    w = np.ascontiguousarray(w)
    part(f"w{i:06d}:{w.dtype.str}:{list(w.shape)}", w.reshape(-1).view(np.uint8))
  rest = {k: v for k, v in meta.items() if k != "checksum"}
  part("meta", json.dumps(rest, sort_keys=True, separators=(",", ":")).encode("utf-8"))
  return h.hexdigest()


def verify(path, meta, exported, weights):
  """An `ExportError` unless the file's contents match the checksum stored at export."""
  stored = meta.get("checksum")
  if not isinstance(stored, dict) or not isinstance(stored.get("sha256"), str):
    raise ExportError(
        f"{path}: no content checksum (not written by python -m cras_jax.export of this "
        f"version, or its meta was edited): export the run again"
    )
  if content_checksum(exported, weights, meta) != stored["sha256"]:
    raise ExportError(
        f"{path}: the contents do not match the checksum stored at export (the scoring "
        f"function, a weight array or the meta were changed or damaged): export the run again"
    )


def load(path):
  """-> dict(meta, weights: list of device arrays, fn: the jitted exported function).
  Weights with NaN or inf (which would make every image "normal"), a file whose contents
  do not match its checksum (`verify`) and one that is not a complete export (truncated, not
  a zip, a member missing) are refused before the function is deserialised."""
  try:
    return _load(path)
  except (zipfile.BadZipFile, EOFError, KeyError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ExportError(
        f"{path}: not a complete file written by python -m cras_jax.export (truncated or "
        f"damaged: {type(e).__name__}: {e}): export the run again"
    ) from e
  except ValueError as e:
    if isinstance(e, ExportError):
      raise
    raise ExportError(f"{path}: cannot be read as an export ({e}): export the run again") from e


def _load(path):
  with np.load(path, allow_pickle=False) as f:
    meta = json.loads(f["meta"].tobytes().decode("utf-8"))
    if not isinstance(meta, dict) or not isinstance(meta.get("num_weights"), int):
      raise ExportError(f"{path}: not a file written by python -m cras_jax.export")
    host = [f[f"w{i:06d}"] for i in range(meta["num_weights"])]
    blob = f["exported"].tobytes()
    bad = [
        f"w{i:06d}" for i, w in enumerate(host) if w.dtype.kind == "f" and not np.isfinite(w).all()
    ]
    if bad:
      raise ExportError(
          f"{path}: {len(bad)} weight array(s) hold NaN or inf ({', '.join(bad[:3])}): the "
          f"file is damaged or was exported from a diverged run; export it again"
      )
    verify(path, meta, blob, host)
    exported = export.deserialize(bytearray(blob))
    weights = [jax.device_put(w) for w in host]
  return {"meta": meta, "weights": weights, "fn": jax.jit(exported.call)}


def _threshold(value, stored):
  """The threshold applied: `value`, else the file's (NaN where the file has none: nothing is
  flagged). A given threshold must be finite: NaN would mark every image normal."""
  if value is not None and not np.isfinite(value):
    raise ValueError(f"threshold {value}: must be a finite number")
  value = stored if value is None else value
  return np.float32(np.nan if value is None else value)


def score(model, images, batch_size=None, image_threshold=None, pixel_threshold=None):
  """uint8 [N, crop, crop, 3] -> dict of numpy arrays [N, ...]. Batches of `batch_size`
  (default: all at once); a short last batch is padded, so each size compiles once."""
  images = np.asarray(images)
  crop = model["meta"]["input"]["crop"]
  if images.ndim >= 1 and len(images) == 0:
    raise ValueError("the image array holds no images (N = 0): give at least one crop")
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (crop, crop, 3):
    raise ValueError(
        f"expected uint8 images [N, {crop}, {crop}, 3], got {images.dtype} {images.shape}"
    )
  stored = model["meta"]["thresholds"]
  ithr = _threshold(image_threshold, stored["image"])
  pthr = _threshold(pixel_threshold, stored["pixel"])
  n = len(images)
  bs = batch_size or n
  parts = []
  for start in range(0, n, bs):
    chunk = images[start : start + bs]
    m = len(chunk)
    if m < bs:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], bs - m, axis=0)])
    out = model["fn"](model["weights"], chunk, ithr, pthr)
    part = {k: np.asarray(v)[:m] for k, v in out.items()}
    if not (np.isfinite(part["scores"]).all() and np.isfinite(part["maps"]).all()):
      raise ExportError(
          f"non-finite scores or maps for images {start}..{start + m - 1}: the model's "
          f"weights or the inputs are damaged"
      )
    parts.append(part)
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("model", help="the .npz file written by python -m cras_jax.export")
  p.add_argument("images", help=".npy file of uint8 [N, crop, crop, 3] preprocessed RGB crops")
  p.add_argument("--batch_size", type=int, default=0, help="images per call (default: all)")
  p.add_argument(
      "--image_threshold",
      type=float,
      default=None,
      help="normalised image threshold (default: the one stored in the file)",
  )
  p.add_argument(
      "--pixel_threshold",
      type=float,
      default=None,
      help="normalised pixel threshold (default: the one stored in the file)",
  )
  p.add_argument("--output", default=None, help="save all outputs to this .npz file")
  p.add_argument("--quiet", action="store_true", help="no per-image lines")
  args = p.parse_args(argv)
  if args.batch_size < 0:
    p.error(f"--batch_size={args.batch_size}: must be >= 0 (0: all images in one call)")
  for name in ("image_threshold", "pixel_threshold"):
    value = getattr(args, name)
    if value is not None and not np.isfinite(value):
      p.error(f"--{name}={value}: must be a finite number (a normalised threshold, e.g. 0.5)")
  if not sys.flags.utf8_mode and sys.getfilesystemencoding().lower().replace("-", "") != "utf8":
    p.error("the locale's text encoding is not UTF-8: run with PYTHONUTF8=1 (or LC_ALL=C.UTF-8)")
  try:
    if args.output:  # before any work
      check_output(args.output)
    images = np.load(args.images, allow_pickle=False)
    if images.ndim >= 1 and len(images) == 0:
      raise ValueError(f"{args.images}: holds no images (N = 0): give at least one crop")
    model = load(args.model)
    out = score(model, images, args.batch_size or None, args.image_threshold, args.pixel_threshold)
    if args.output:
      save_outputs(args.output, out)
  except (ValueError, OSError, KeyError) as e:  # the user's files: one message, status 2
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None
  print_results(range(len(images)), "index", out, model["meta"], args, quiet=args.quiet)
  return out
