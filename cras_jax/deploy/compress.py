"""A run's ONNX file in float16 or int8 (`python -m cras_jax.export --format=onnx --precision=...`):
the float32 graph of `onnx_export` rewritten, then checked against it before it is written.

fp16: every weight with at least two dimensions above 1 (convolution kernels, matrices, the
class centres, the resize and smoothing matrices) is stored as float16 and cast to float32 in the
graph (`to_fp16`); vectors and scalars (the folded BatchNorm's per-channel mean, scale and shift,
biases, the normalisation) stay float32: the BatchNorm's mean subtraction cancels, and its mean
in float16 moved a demo image's normalised score by 2.2 (0.19 with the vectors in float32).
The file is half the size; the runtimes compute in float32 (onnxruntime's CPU provider has no
x86 float16 convolution: it wraps float16 nodes in casts and ran slower than float32; OpenVINO
is pinned to f32 by run_onnx), so only the weights' rounding changes the scores.

int8 (`to_int8`): onnxruntime's post-training static quantization (QDQ, weights int8 per
channel, activations uint8, MinMax ranges) calibrated on the run's normal training images, after
three exact rewrites that make it accurate: onnxruntime's own basic graph optimisation (the
layout transposes removed: `quant_pre_process`), the per-channel affine after each convolution
(the folded BatchNorm) folded into its kernel and bias (`fold_conv_affine`; an output channel
whose kernel is 1e5 times smaller than the layer's largest is a dead channel and set to zero,
so its bias needs no extreme int32 scale) and ReLU6 written as Clip (`relu_to_clip`), so each
activation is quantised over the range it keeps. Quantised: the convolutions and their Clips,
i.e. the nodes that feed the adapter (`feature_nodes`). Kept in float32: the adapter, the
matching (the MatMul and arg-max over the class centres, the nearest-patch Einsum and arg-max),
the discriminator, the anomaly map's upsampling and smoothing, the normalisation and
the thresholds (docs/deploy.md: the measurements that decided this).

`compress` then scores the held-back normal images with the float32 and the compressed graph,
re-fits the thresholds on the compressed graph's own scores of the threshold images (the run's
rule, `threshold_fit.fit`), and refuses (`CompressionRefused`, exit status 2) a file whose
decisions differ from float32's on more than `max_flip_rate` of the held-back images.

Imports onnx, numpy and onnxruntime (its quantization tools ship inside it); no JAX.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
from collections.abc import Callable, Sequence

import numpy as np
import onnx
from onnx import helper

from cras_jax.base import errors
from cras_jax.deploy import run_onnx
from cras_jax.deploy.onnx_rewrites import (
    normalisation_names,
    set_initializer,
    to_fp16,
)
from cras_jax.deploy.quantize import BATCH, to_int8

PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_CALIBRATION_IMAGES = 200
DEFAULT_MAX_FLIP_RATE = 0.05
MIN_HELD_BACK = 20  # fewer training images left than this: the test split's normal images check
MAX_CHECK_IMAGES = 200  # held-back images scored by the check, at most


class CompressionRefused(errors.UserValueError):
  """The compressed graph's decisions differ from float32's beyond the bound (the message gives
  the figures and the override)."""


# ----------------------------------------------------------------------------- graph helpers


# ----------------------------------------------------------------------------- the precisions


# ----------------------------------------------------------------------------- normalisation


# ----------------------------------------------------------------------------- the check


@dataclasses.dataclass
class ThresholdImages:
  """The images the run's thresholds were fitted on, to re-fit them on the compressed graph's
  scores: `split` holds image [N, c, c, 3] uint8 and what `fit` reads besides the scores (label,
  is_anomaly, mask, name, has_mask); fit(res, class_names) -> a thresholds.json dict."""

  split: dict
  fit: Callable[[dict, Sequence[str]], dict]
  rule: str  # said in the meta and the printed check


@dataclasses.dataclass
class CheckImages:
  """What the compressed export is calibrated and checked on."""

  calibration: np.ndarray
  calibration_identity: dict
  held: np.ndarray
  held_source: str
  threshold_images: ThresholdImages | None = None


def image_identity(images: np.ndarray, names: Sequence[str], split: str, rule: str) -> dict:
  """A set of images as the meta records it: count, SHA-256 of the crops' bytes (in order) and
  of their names, the split and the selection rule."""
  images = np.ascontiguousarray(images)
  return {
      "count": int(len(images)),
      "split": split,
      "selection": rule,
      "sha256_crops": hashlib.sha256(images.tobytes()).hexdigest(),
      "sha256_names": hashlib.sha256("\n".join(map(str, names)).encode("utf-8")).hexdigest(),
  }


def stamp(model: onnx.ModelProto, meta: dict) -> bytes:
  """The model's bytes with `meta` and the checksum over them in its metadata (the checksum's
  entry written as 64 zeros while the SHA-256 over the whole file is computed:
  `run_onnx.file_checksum`)."""
  del model.metadata_props[:]
  helper.set_model_props(
      model, {run_onnx.META_KEY: json.dumps(meta), run_onnx.SUM_KEY: run_onnx.PLACEHOLDER}
  )
  data = model.SerializeToString()
  if data.count(run_onnx.PLACEHOLDER.encode()) != 1:
    raise RuntimeError("the checksum's placeholder occurs more than once in the serialised model")
  digest = hashlib.sha256(data).hexdigest()
  out = data.replace(run_onnx.PLACEHOLDER.encode(), digest.encode())
  assert run_onnx.file_checksum(out, digest) == digest
  return out


def _session(data: bytes, meta: dict, runtime: str) -> dict:
  return run_onnx.from_bytes(data, meta, runtime, path=f"the {meta.get('precision', 'fp32')} graph")


def _finite(x) -> float | None:
  return float(x) if x is not None and math.isfinite(x) else None


def compare(got: dict, want: dict, image_threshold) -> dict:
  """The cost of `got` against `want` (float32), both scored at their own thresholds: drift of
  the normalised image scores, share of images decided otherwise (None without a threshold),
  share of matched classes and mask pixels that differ."""
  dz = np.abs(got["normalised_scores"].astype(np.float64) - want["normalised_scores"])
  decided = image_threshold is not None and math.isfinite(image_threshold)
  flips = got["is_anomaly"] != want["is_anomaly"]
  return {
      "images": int(len(dz)),
      "score_drift_max": float(dz.max()),
      "score_drift_mean": float(dz.mean()),
      "flip_rate": float(flips.mean()) if decided else None,
      "flips": int(flips.sum()) if decided else None,
      "class_changes": int((got["cls"] != want["cls"]).sum()),
      "mask_pixel_disagreement": float((got["masks"] != want["masks"]).mean()),
  }


def _disagrees(check: dict, onnxruntime: dict | None, max_flip_rate: float) -> str:
  """Why a runtime's check fails, or "": its decisions differ from float32's on more than
  `max_flip_rate` of the images; for a runtime other than onnxruntime (whose figures the file
  states) also its matched classes, or a score drift more than twice onnxruntime's (and 0.05)."""
  rate = check["flip_rate"]
  if rate is not None and rate > max_flip_rate:
    return (
        f"its decisions differed from float32's on {rate:.1%} of the held-back normal images "
        f"(bound {max_flip_rate:.1%})"
    )
  if onnxruntime is None or check is onnxruntime:
    return ""
  changed = check["class_changes"] / max(check["images"], 1)
  if changed > max_flip_rate:
    return f"it matched {changed:.1%} of the held-back images to another class than float32"
  allowed = max(2 * onnxruntime["score_drift_mean"], 0.05)
  if check["score_drift_mean"] > allowed:
    return (
        f"its normalised scores drifted from float32's by {check['score_drift_mean']:.3f} on "
        f"average, more than twice onnxruntime's {onnxruntime['score_drift_mean']:.3f} on the "
        f"same file"
    )
  return ""


def _runtimes() -> list[str]:
  """The runtimes installed here (found, not imported)."""
  return [name for name in run_onnx.RUNTIMES if importlib.util.find_spec(name) is not None]


def compress(
    model32: onnx.ModelProto,
    meta32: dict,
    precision: str,
    images: CheckImages,
    max_flip_rate: float = DEFAULT_MAX_FLIP_RATE,
    force: bool = False,
    runtimes: Sequence[str] | None = None,
) -> tuple[bytes, dict]:
  """The compressed file's bytes (stamped: meta and checksum) and its meta.

  model32, meta32: the float32 export (`onnx_export.score_graph` and its meta). Raises
  `CompressionRefused` when the compressed graph decides more than `max_flip_rate` of the
  held-back images otherwise than float32 under onnxruntime (unless `force`)."""
  if precision not in PRECISIONS[1:]:
    raise ValueError(f"precision {precision!r}: one of {PRECISIONS[1:]}")
  import onnxruntime  # noqa: PLC0415 - required by the export's check

  backbone = str(meta32.get("backbone", ""))
  if precision == "fp16":
    model, info = to_fp16(model32, backbone)
  else:
    model, info = to_int8(model32, images.calibration, backbone)
  meta = json.loads(json.dumps(meta32))
  meta["precision"] = precision
  meta["versions"]["onnxruntime"] = onnxruntime.__version__
  data32 = stamp(model32, meta32)
  reference = _session(data32, meta32, "onnxruntime")
  want_held = run_onnx.score(reference, images.held, BATCH)

  thresholds = _refit(model, meta, meta32, images.threshold_images, reference)
  runtimes = list(runtimes) if runtimes is not None else _runtimes()
  runtimes.sort(key=lambda r: r != "onnxruntime")  # onnxruntime's figures first: the others'
  checks, verified = {}, {}
  for runtime in runtimes:
    try:
      session = _session(stamp(model, meta), meta, runtime)
      got = run_onnx.score(session, images.held, BATCH)
    except run_onnx.ExportError as e:
      verified[runtime] = {"verified": False, "reason": f"it could not run the graph ({e})"}
      continue
    checks[runtime] = compare(got, want_held, meta["thresholds"]["image"])
    why = _disagrees(checks[runtime], checks.get("onnxruntime"), max_flip_rate)
    # --force accepts onnxruntime's measured cost (the file's); another runtime that disagrees
    # with it stays refused by run_onnx
    forced = bool(why) and force and runtime == "onnxruntime"
    verified[runtime] = {"verified": not why or forced}
    if why:
      verified[runtime]["reason"] = f"at export {why}" + (" (accepted: --force)" if forced else "")
    if runtime == "openvino":
      import openvino  # noqa: PLC0415 - installed: it ran

      meta["versions"]["openvino"] = openvino.__version__
  if "onnxruntime" not in checks:
    raise RuntimeError(f"onnxruntime could not run the {precision} graph: {verified}")
  meta["compression"] = {
      "precision": precision,
      **info,
      "calibration": images.calibration_identity if precision == "int8" else None,
      "check": {
          "images": images.held_source,
          "max_flip_rate": max_flip_rate,
          "forced": bool(force),
          "against": "the float32 export of the same run, scored by onnxruntime",
          "runtimes": checks,
      },
      "thresholds": thresholds,
      "runtimes": verified,
  }
  main = checks["onnxruntime"]
  if main["flip_rate"] is not None and main["flip_rate"] > max_flip_rate and not force:
    raise CompressionRefused(
        f"--precision={precision}: the compressed model decides {main['flips']} of "
        f"{main['images']} held-back normal images ({images.held_source}) otherwise than "
        f"float32 (flip rate {main['flip_rate']:.3f} > --max_flip_rate={max_flip_rate:g}; "
        f"normalised score drift max {main['score_drift_max']:.3f}, mean "
        f"{main['score_drift_mean']:.3f}); nothing was written. Accept it with "
        f"--max_flip_rate={math.ceil(main['flip_rate'] * 100) / 100:g} or --force, or export "
        f"--precision={'fp16' if precision == 'int8' else 'fp32'}"
    )
  return stamp(model, meta), meta


def _refit(model, meta: dict, meta32: dict, images: ThresholdImages | None, reference) -> dict:
  """Re-fits the normalisation and thresholds on the compressed graph's scores of the threshold
  images (the run's rule) where the run's came from its thresholds.json; sets them in `model`
  and `meta`. -> what the meta records of it."""
  run_values = {
      "image": meta32["thresholds"]["image"],
      "pixel": meta32["thresholds"]["pixel"],
      "loc": meta32["normalisation"]["loc"],
      "scale": meta32["normalisation"]["scale"],
  }
  source = meta32["thresholds"].get("source")
  why = None
  if source != "file":
    why = (
        "the run has no thresholds.json: nothing to re-fit"
        if source == "none"
        else f"the thresholds were given (source {source}): kept as given"
    )
  elif images is None:
    why = "the threshold images are not available here: the run's values are kept"
  names = None
  if why is None:
    names = normalisation_names(model, run_values["loc"], run_values["scale"])
    if names is None:
      why = "the normalisation could not be located in the graph: the run's values are kept"
  if why is not None:
    return {"choice": "kept", "why": why, "run": run_values}
  data = stamp(model, meta)
  out = run_onnx.score(_session(data, meta, "onnxruntime"), images.split["image"], BATCH)
  res = {k: v for k, v in images.split.items() if k != "image"}
  res.update(scores=out["scores"], maps=out["maps"], cls=out["cls"])
  d = images.fit(res, meta["class_names"])
  loc = np.asarray(d["normalisation"]["loc"], np.float32)
  scale = np.asarray(d["normalisation"]["scale"], np.float32)
  set_initializer(model, names[0], loc)
  set_initializer(model, names[1], scale)
  meta["normalisation"]["loc"] = loc.tolist()
  meta["normalisation"]["scale"] = scale.tolist()
  meta["thresholds"]["image"] = _finite(d["image_threshold"])
  meta["thresholds"]["pixel"] = _finite(d["pixel_threshold"])
  meta["thresholds"]["source"] = f"file, re-fitted on the {meta['precision']} graph's scores"
  # the threshold images' decisions against float32's: at the run's thresholds (`out`, scored
  # before the re-fit) and at the re-fitted ones
  want = run_onnx.score(reference, images.split["image"], BATCH)
  data = stamp(model, meta)
  refit = run_onnx.score(_session(data, meta, "onnxruntime"), images.split["image"], BATCH)
  return {
      "choice": "re-fitted",
      "rule": images.rule,
      "why": "the compressed graph shifts the normal images' scores; the run's rule re-applied "
      "to its own scores of the same images gives decisions that mean what the run's do",
      "run": run_values,
      "refit": {
          "image": meta["thresholds"]["image"],
          "pixel": meta["thresholds"]["pixel"],
          "calibration_f1": d.get("calibration_f1"),
          "report": {k: d["report"][k] for k in ("image", "pixel") if k in d.get("report", {})},
      },
      "threshold_images": {
          "at_run_thresholds": compare(out, want, run_values["image"]),
          "at_refit_thresholds": compare(refit, want, meta["thresholds"]["image"]),
      },
  }


def _g(x) -> str:
  return "n/a" if x is None else f"{x:.4g}"


def summary(meta: dict) -> str:
  """The check as the export prints it."""
  c = meta["compression"]
  lines = [f"{meta['precision']}: checked on {c['check']['images']}, against float32:"]
  for runtime, r in c["check"]["runtimes"].items():
    rate = "n/a (no image threshold)" if r["flip_rate"] is None else f"{r['flip_rate']:.3f}"
    lines.append(
        f"  {runtime}: normalised score drift max {r['score_drift_max']:.3f}, mean "
        f"{r['score_drift_mean']:.3f}; flip rate {rate} ({r['flips']} of {r['images']}); "
        f"matched class changed on {r['class_changes']}"
    )
  for runtime, v in c["runtimes"].items():
    if not v["verified"]:
      lines.append(f"  {runtime}: NOT for this file ({v.get('reason')}); run_onnx refuses it there")
  t = c["thresholds"]
  if t["choice"] == "re-fitted":
    lines.append(
        f"  thresholds re-fitted on its own scores ({t['rule']}): image "
        f"{_g(t['run']['image'])} -> {_g(t['refit']['image'])}, pixel {_g(t['run']['pixel'])} "
        f"-> {_g(t['refit']['pixel'])}"
    )
  else:
    lines.append(f"  thresholds kept: {t['why']}")
  return "\n".join(lines)
