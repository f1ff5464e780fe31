"""Scores images with a model exported by `python -m cras_jax.export --format=onnx`, without JAX:
onnxruntime (or OpenVINO) and numpy, plus Pillow to read image files.

    python -m cras_jax.run_onnx model.onnx crops.npy [--runtime=onnxruntime|openvino]
    python -m cras_jax.run_onnx model.onnx image.png folder/ ... [--output=scores.npz]

Inputs: a .npy of uint8 [N, crop, crop, 3] RGB crops already preprocessed, or image files and
folders of them, preprocessed here by `preprocess` (the run's resize and centre crop, recorded
in the file; the same pixels as the training's loader for 8-bit images). Prints one line per
image; --output saves every output (scores, maps, patch, cls, normalised_scores, is_anomaly,
masks) as arrays of N rows.

From Python: `model = load("model.onnx"); out = score(model, crops, batch_size=8)`.

This module imports neither JAX nor the rest of cras_jax (but `deploy.outputs`, the output
file shared with `run_exported`: NumPy only). Loading reads the file once, checks
that cras_jax wrote it (its metadata entry "cras_jax.meta") and verifies its SHA-256
(`file_checksum`) before a runtime sees it: a file changed after export is refused.

Every precision of `python -m cras_jax.export --precision` (fp32, fp16, int8) is read the same
way, with nothing more installed: a compressed file holds float16 weights or int8 QDQ nodes of
the standard ONNX domain. Its meta names the runtimes its export checked it on
(meta["compression"]["runtimes"]); another runtime is refused (`check_runtime`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import numpy as np

from cras_jax.base import image_limits
from cras_jax.deploy.onnx_metadata import metadata_props
from cras_jax.deploy.outputs import (
    check_output,
    print_results,
    save_outputs,
)

FORMAT = "cras_jax.onnx_scoring"
FORMAT_VERSION = 1
META_KEY = "cras_jax.meta"
SUM_KEY = "cras_jax.sha256"
PLACEHOLDER = "0" * 64  # the checksum's value while the checksum is computed
RUNTIMES = ("onnxruntime", "openvino")
PINS = {"onnxruntime": "onnxruntime==1.32.0", "openvino": "openvino==2026.4.1"}
OPENVINO_SIZES_KEPT = 4  # batch sizes OpenVINO keeps compiled (`_openvino`)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class ExportError(ValueError):
  """The file or the inputs cannot be used (the message names which, and the fix)."""


# ----------------------------------------------------------------------------- the file


# Words of a runtime's refusal that say why (an opset or IR version it lacks, an operator it
# does not support), kept when the rest of the message is C++ frames and signatures.
_REASON_WORDS = ("opset", "ir version", "ir_version", "unsupported", "not supported", "version")


def runtime_reason(e: BaseException, limit: int = 400) -> str:
  """A runtime's refusal in one line: the lines that name the cause (`_REASON_WORDS`), else
  the whole message; past `limit` characters the END is kept (where runtimes put the reason),
  never a cut inside the first C++ signature."""
  lines = [" ".join(line.split()) for line in str(e).splitlines()]
  lines = [line for line in lines if line]
  named = [line for line in lines if any(w in line.lower() for w in _REASON_WORDS)]
  text = " | ".join(dict.fromkeys(named or lines)) or type(e).__name__
  return text if len(text) <= limit else "..." + text[-limit:]


def file_checksum(data: bytes, stored: str) -> str:
  """SHA-256 (hex) of an export's bytes with the stored checksum `stored` written as 64 zeros
  (how `cras_jax.export` computed it): covers the graph, every weight and the meta."""
  token = stored.encode()
  if len(token) != 64 or data.count(token) != 1:
    return ""
  return hashlib.sha256(data.replace(token, PLACEHOLDER.encode())).hexdigest()


def read(path: str) -> tuple[bytes, dict]:
  """(the file's bytes, its meta), checked: a cras_jax export of this format, unchanged."""
  redo = "export the run again (python -m cras_jax.export --format=onnx --workdir=<run>)"
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise ExportError(f"{path}: cannot be read ({e.strerror or e})") from None
  if not data:
    raise ExportError(f"{path}: the file is empty (0 bytes): {redo}")
  try:
    props = metadata_props(data)
  except (ValueError, UnicodeDecodeError) as e:
    raise ExportError(f"{path}: not an ONNX file ({e}): {redo}") from None
  if META_KEY not in props:
    raise ExportError(
        f"{path}: an ONNX file not written by cras_jax (no {META_KEY!r} metadata entry): "
        f"score it with its own tool, or {redo}"
    )
  try:
    meta = json.loads(props[META_KEY])
  except json.JSONDecodeError as e:
    raise ExportError(f"{path}: its {META_KEY!r} entry is not JSON ({e}): {redo}") from None
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise ExportError(f"{path}: its {META_KEY!r} entry is not a cras_jax ONNX export: {redo}")
  if meta.get("format_version") != FORMAT_VERSION:
    raise ExportError(
        f"{path}: format version {meta.get('format_version')}, this reader reads "
        f"{FORMAT_VERSION}: use the cras_jax version that wrote it ({meta.get('versions')}), "
        f"or {redo}"
    )
  stored = props.get(SUM_KEY, "")
  if len(stored) != 64 or data.count(stored.encode()) != 1:  # absent is not verified
    raise ExportError(
        f"{path}: no checksum of its contents in its metadata ({SUM_KEY!r} is missing or "
        f"malformed), so changes to it cannot be detected: {redo}"
    )
  if file_checksum(data, stored) != stored:
    raise ExportError(
        f"{path}: the contents do not match the checksum stored at export (the graph, a weight "
        f"or the meta were changed or damaged): {redo}"
    )
  return data, meta


def load(path: str, runtime: str = "onnxruntime", threads: int = 0) -> dict:
  """-> dict(meta, runtime, run: (images, image_threshold, pixel_threshold) -> dict of
  arrays). The file is read and verified (`read`) before the runtime sees its bytes; a
  compressed file (fp16, int8) only by a runtime its export checked (`check_runtime`)."""
  if runtime not in RUNTIMES:
    raise ExportError(f"--runtime={runtime}: choose one of {', '.join(RUNTIMES)}")
  data, meta = read(path)
  check_runtime(meta, runtime, path)
  return from_bytes(data, meta, runtime, threads, path)


def from_bytes(data: bytes, meta: dict, runtime: str, threads: int = 0, path: str = "") -> dict:
  """`load`'s model from a file's bytes and meta already read (the export's own check scores
  the graph it is about to write this way)."""
  if runtime == "onnxruntime":
    run = _onnxruntime(data, path, threads)
  else:
    run = _openvino(data, path, threads, list(meta["outputs"]))
  return {"meta": meta, "runtime": runtime, "run": run, "path": path}


def precision(meta: dict) -> str:
  """The precision of an export's weights and arithmetic: fp32 (a file without the entry), fp16
  or int8 (`python -m cras_jax.export --precision`)."""
  return str(meta.get("precision", "fp32"))


def check_runtime(meta: dict, runtime: str, path: str) -> None:
  """An `ExportError` for a compressed file and a runtime its export did not check or found
  wrong (meta["compression"]["runtimes"]): its scores there are unmeasured or known bad."""
  if precision(meta) == "fp32":
    return
  runtimes = (meta.get("compression") or {}).get("runtimes") or {}
  entry = runtimes.get(runtime)
  if entry and entry.get("verified"):
    return
  ok = [r for r, v in runtimes.items() if v.get("verified")]
  instead = f"score it with --runtime={ok[0]}, or " if ok else ""
  p = precision(meta)
  command = "python -m cras_jax.export --format=onnx --precision="
  if entry:
    why = entry.get("reason") or "its scores there were wrong"
    other = "fp32" if p == "fp16" else "fp32 or fp16"
    fix = f"export the run for {runtime} with {command}{other}"
  else:
    why = (
        f"{runtime} was not installed where it was exported, so its scores there were never "
        "checked"
    )
    fix = f"export it again where {runtime} is installed ({command}{p})"
  raise ExportError(
      f"{path}: this {p} export cannot be scored with {runtime}: {why}; {instead}{fix}"
  )


def _missing(runtime: str) -> ExportError:
  other = [r for r in RUNTIMES if r != runtime][0]
  return ExportError(
      f"{runtime} is not installed: pip install {PINS[runtime]} (or score with "
      f"--runtime={other})"
  )


def _onnxruntime(data: bytes, path: str, threads: int):
  try:
    import onnxruntime as ort  # noqa: PLC0415 - optional: imported only when chosen
  except ImportError:
    raise _missing("onnxruntime") from None
  options = ort.SessionOptions()
  if threads:
    options.intra_op_num_threads = threads
  options.log_severity_level = 3
  try:
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
  except Exception as e:  # noqa: BLE001 - the runtime's own error, named with the file
    raise ExportError(f"{path}: onnxruntime cannot load it ({runtime_reason(e)})") from None
  names = [o.name for o in session.get_outputs()]

  def run(images, ithr, pthr):
    feed = {
        "images": images,
        "image_threshold": np.asarray(ithr),
        "pixel_threshold": np.asarray(pthr),
    }
    return dict(zip(names, session.run(names, feed)))

  return run


def _import_openvino():
  """`import openvino`, without its telemetry. OpenVINO 2026.4's import starts
  `openvino_telemetry`, which sends a usage event from a forked process: a connection a factory
  PC should not make, and a fork that can deadlock a process running JAX's threads (the
  export's check, deploy_bench). Without the module, OpenVINO uses its own stub; a process that
  imported it before keeps it."""
  blocked = "openvino_telemetry" not in sys.modules
  if blocked:
    sys.modules["openvino_telemetry"] = None  # its import now raises ImportError
  try:
    import openvino  # noqa: PLC0415 - optional: imported only when chosen
  except ImportError:
    raise _missing("openvino") from None
  finally:
    if blocked and sys.modules.get("openvino_telemetry", 0) is None:
      del sys.modules["openvino_telemetry"]
  return openvino


def _openvino(data: bytes, path: str, threads: int, outputs: list[str]):
  """OpenVINO's runner: the graph compiled for each batch size it is called with (a static
  shape; the first for batch 1, to check at load that OpenVINO takes the file; the
  `OPENVINO_SIZES_KEPT` sizes used last stay compiled). With the batch
  left symbolic, OpenVINO 2026.4's CPU plugin computed the demo's int8 graph wrongly (every
  held-back image decided otherwise than float32; docs/deploy.md); with static shapes it agrees
  with onnxruntime, for every precision."""
  ov = _import_openvino()
  core = ov.Core()
  # float32 throughout: OpenVINO's CPU plugin otherwise computes in bfloat16 on CPUs that have
  # it, and its scores then differ from the model's by up to ~30% (docs/deploy.md).
  config = {"INFERENCE_PRECISION_HINT": "f32"}
  if threads:
    config["INFERENCE_NUM_THREADS"] = threads
  wanted = set(outputs)
  requests: dict[int, tuple] = {}  # batch size -> (request, ports), the latest used last

  def compiled_for(batch: int) -> tuple:
    if batch in requests:
      requests[batch] = requests.pop(batch)
    else:
      if len(requests) >= OPENVINO_SIZES_KEPT:  # a caller of many sizes: the least recent goes
        del requests[next(iter(requests))]
      try:
        model = core.read_model(data)
        shape = list(model.input("images").get_partial_shape())
        model.reshape({"images": [batch, *(d.get_length() for d in shape[1:])]})
        compiled = core.compile_model(model, "CPU", config)
      except Exception as e:  # noqa: BLE001 - the runtime's own error, named with the file
        raise ExportError(f"{path}: OpenVINO cannot load it ({runtime_reason(e)})") from None
      ports = {(set(o.get_names()) & wanted).pop(): o for o in compiled.outputs}
      requests[batch] = (compiled.create_infer_request(), ports)
    return requests[batch]

  compiled_for(1)

  def run(images, ithr, pthr):
    request, ports = compiled_for(len(images))
    res = request.infer(
        {"images": images, "image_threshold": np.asarray(ithr), "pixel_threshold": np.asarray(pthr)}
    )
    return {name: np.array(res[port]) for name, port in ports.items()}

  return run


# ----------------------------------------------------------------------------- scoring


def _threshold(value, stored, name: str):
  """The threshold applied: `value`, else the file's (NaN where the file has none: nothing
  is flagged). A given threshold must be finite: NaN would mark every image normal."""
  if value is not None and not np.isfinite(value):
    raise ExportError(f"--{name}={value}: must be a finite number (a normalised threshold)")
  value = stored if value is None else value
  return np.asarray(np.nan if value is None else value, np.float32)


def score(model, images, batch_size=None, image_threshold=None, pixel_threshold=None) -> dict:
  """uint8 [N, crop, crop, 3] -> dict of numpy arrays [N, ...], in batches of `batch_size`
  (default all at once)."""
  meta = model["meta"]
  crop = meta["input"]["crop"]
  images = np.asarray(images)
  if images.ndim >= 1 and len(images) == 0:
    raise ExportError("the image array holds no images (N = 0): give at least one crop")
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (crop, crop, 3):
    raise ExportError(
        f"expected uint8 images [N, {crop}, {crop}, 3] (the model's crop), got {images.dtype} "
        f"{list(images.shape)}: preprocess image files with run_onnx.preprocess"
    )
  if batch_size is not None and batch_size < 1:
    raise ExportError(f"--batch_size={batch_size}: must be >= 1")
  ithr = _threshold(image_threshold, meta["thresholds"]["image"], "image_threshold")
  pthr = _threshold(pixel_threshold, meta["thresholds"]["pixel"], "pixel_threshold")
  bs = batch_size or len(images)
  parts = []
  for start in range(0, len(images), bs):
    chunk = np.ascontiguousarray(images[start : start + bs])
    part = model["run"](chunk, ithr, pthr)
    if not (np.isfinite(part["scores"]).all() and np.isfinite(part["maps"]).all()):
      raise ExportError(
          f"{model['path']}: non-finite scores or maps for images {start}..{start + len(chunk) - 1}"
          f": the model's weights or the inputs are damaged"
      )
    parts.append(part)
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# ----------------------------------------------------------------------------- images


def preprocess(path: str, resize: int, crop: int, limits: dict | None = None) -> np.ndarray:
  """One image file as the model's input, uint8 [crop, crop, 3]: 8-bit RGB (grey replicated,
  alpha dropped), the shorter side resized to `resize` (the other to int(resize * long /
  short)) with PIL's bilinear filter, then the centre crop (zero padding where the image is
  smaller): torchvision Resize + CenterCrop, as the training's loader does. Images of more than
  8 bits per channel are refused here (the training's loader rescales them by their range).
  limits: `image_limits.problem`'s (the export's, `image_limits.from_meta`; default the
  schema's): a file declaring a larger size is refused unread, as predict refuses it."""
  from PIL import Image, UnidentifiedImageError  # noqa: PLC0415 - only for image files

  limits = limits or image_limits.from_meta({})
  try:
    with Image.open(path) as im:
      why = image_limits.problem(*im.size, **limits)
      if why:
        raise ExportError(
            f"{path}: refused unread: {why}; the limit is the run's, recorded in the export "
            f"(python -m cras_jax.predict refuses this file too): crop or resize it first"
        )
      if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        raise ExportError(
            f"{path}: {im.mode} pixels (more than 8 bits): save it as 8-bit, or preprocess it "
            f"with cras_jax (python -m cras_jax.predict --save_crops)"
        )
      rgb = im.convert("RGB")
  except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
    raise ExportError(f"{path}: not a readable image ({e})") from None
  w, h = rgb.size
  short, long = (w, h) if w <= h else (h, w)
  new_short, new_long = resize, int(resize * long / short)
  new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
  if (new_w, new_h) != (w, h):
    rgb = rgb.resize((new_w, new_h), Image.BILINEAR)
  arr = np.asarray(rgb, dtype=np.uint8)
  ph, pw = max(crop - new_h, 0), max(crop - new_w, 0)
  if ph or pw:
    arr = np.pad(arr, [(ph // 2, (ph + 1) // 2), (pw // 2, (pw + 1) // 2), (0, 0)])
  hh, ww = arr.shape[:2]
  top, left = int(round((hh - crop) / 2.0)), int(round((ww - crop) / 2.0))
  return np.ascontiguousarray(arr[top : top + crop, left : left + crop])


def _image_files(inputs: list[str]) -> list[str]:
  out = []
  for p in inputs:
    if os.path.isdir(p):
      found = sorted(
          os.path.join(d, f)
          for d, _, files in os.walk(p)
          for f in files
          if f.lower().endswith(IMAGE_SUFFIXES)
      )
      if not found:
        raise ExportError(f"{p}: a folder with no images ({', '.join(IMAGE_SUFFIXES)})")
      out += found
    elif os.path.isfile(p):
      out.append(p)
    else:
      raise ExportError(f"{p}: no such file or folder")
  return out


def inputs_to_crops(inputs: list[str], meta: dict) -> tuple[np.ndarray, list[str]]:
  """(crops, their names) from one .npy of crops or from image files and folders."""
  if len(inputs) == 1 and inputs[0].endswith(".npy"):
    try:
      crops = np.load(inputs[0], allow_pickle=False)
    except (OSError, ValueError) as e:
      raise ExportError(f"{inputs[0]}: not a readable .npy array ({e})") from None
    if crops.ndim >= 1 and len(crops) == 0:
      raise ExportError(f"{inputs[0]}: holds no images (N = 0): give at least one crop")
    crop = meta["input"]["crop"]
    if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[1:] != (crop, crop, 3):
      raise ExportError(
          f"{inputs[0]}: expected uint8 images [N, {crop}, {crop}, 3] (the model's crop), got "
          f"{crops.dtype} {list(crops.shape)}: give image files instead (preprocessed here), "
          f"or crops written by python -m cras_jax.predict --save_crops"
      )
    return crops, [f"{inputs[0]}[{i}]" for i in range(len(crops))]
  files = _image_files(inputs)
  resize, crop = meta["input"]["resize"], meta["input"]["crop"]
  limits = image_limits.from_meta(meta)
  return np.stack([preprocess(f, resize, crop, limits) for f in files]), files


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("model", help="the .onnx file written by python -m cras_jax.export --format=onnx")
  p.add_argument("inputs", nargs="+", help="a .npy of uint8 crops, or image files and folders")
  p.add_argument("--runtime", default="onnxruntime", choices=RUNTIMES)
  p.add_argument("--batch_size", type=int, default=0, help="images per call (0: all at once)")
  p.add_argument("--threads", type=int, default=0, help="the runtime's threads (0: its default)")
  for name in ("image_threshold", "pixel_threshold"):
    p.add_argument(
        f"--{name}", type=float, default=None, help="normalised; default: the file's own"
    )
  p.add_argument("--output", default=None, help="save every output to this .npz file")
  p.add_argument("--quiet", action="store_true", help="no per-image lines")
  args = p.parse_args(argv)
  for name in ("batch_size", "threads"):
    if getattr(args, name) < 0:
      p.error(f"--{name}={getattr(args, name)}: must be >= 0")
  try:
    if args.output:  # before any work
      check_output(args.output)
    model = load(args.model, args.runtime, args.threads)
    crops, names = inputs_to_crops(args.inputs, model["meta"])
    out = score(model, crops, args.batch_size or None, args.image_threshold, args.pixel_threshold)
    if args.output:
      save_outputs(args.output, out)
  except (ExportError, OSError) as e:  # the user's files: one message, status 2
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None
  print_results(names, "image", out, model["meta"], args, quiet=args.quiet)
  return out
