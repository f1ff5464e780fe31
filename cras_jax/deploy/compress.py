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
activation is quantised over the range it keeps. Quantised: the convolutions, their Clips and the
adapter's MatMul, i.e. the nodes that feed the adapter's output (`feature_nodes`). Kept in float32:
the matching (the MatMul and arg-max over the class centres, the nearest-patch Einsum and
arg-max), the discriminator, the anomaly map's upsampling and smoothing, the normalisation and
the thresholds (docs/deploy.md: the measurements that decided this).

`compress` then scores the held-back normal images with the float32 and the compressed graph,
re-fits the thresholds on the compressed graph's own scores of the threshold images (the run's
rule, `thresholds.fit`), and refuses (`CompressionRefused`, exit status 2) a file whose
decisions differ from float32's on more than `max_flip_rate` of the held-back images.

Imports onnx, numpy and onnxruntime (its quantization tools ship inside it); no JAX.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from cras_jax.base import errors
from cras_jax.deploy import run_onnx

PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_CALIBRATION_IMAGES = 200
DEFAULT_MAX_FLIP_RATE = 0.05
MIN_HELD_BACK = 20  # fewer training images left than this: the test split's normal images check
MAX_CHECK_IMAGES = 200  # held-back images scored by the check, at most
DEAD_CHANNEL = 1e-5  # a folded kernel's channel this much smaller than the layer's largest: zero
FP16_MAX = float(np.finfo(np.float16).max)
BATCH = 8  # images per call while calibrating and checking
INT8_OPS = ("Conv", "Clip", "MatMul")


class CompressionRefused(errors.UserValueError):
  """The compressed graph's decisions differ from float32's beyond the bound (the message gives
  the figures and the override)."""


# ----------------------------------------------------------------------------- graph helpers


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
  out: dict[str, list[onnx.NodeProto]] = {}
  for node in graph.node:
    for name in node.input:
      out.setdefault(name, []).append(node)
  return out


def _initializers(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
  return {t.name: t for t in graph.initializer}


def _drop_nodes_and_unused(graph: onnx.GraphProto, dead: set[int]) -> None:
  keep = [n for n in graph.node if id(n) not in dead]
  del graph.node[:]
  graph.node.extend(keep)
  used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
  inits = [t for t in graph.initializer if t.name in used]
  del graph.initializer[:]
  graph.initializer.extend(inits)


def _per_channel(value: np.ndarray, channels: int) -> np.ndarray | None:
  """A constant broadcast against NCHW [b, channels, h, w] as one value per channel, or None."""
  if value.size == 1:
    return np.full(channels, float(value.reshape(-1)[0]))
  if value.shape in ((1, channels, 1, 1), (channels, 1, 1)):
    return value.reshape(-1).astype(np.float64)
  return None


def _index(model: onnx.ModelProto):
  """(graph, its initializers by name, each value's consumers, the graph's output names)."""
  g = model.graph
  return g, _initializers(g), _consumers(g), {o.name for o in g.output}


def fold_conv_affine(model: onnx.ModelProto) -> int:
  """Folds each chain of per-channel Sub/Mul/Add/Div by constants after a Conv (NCHW, its only
  consumer each time) into the Conv's kernel and bias; channels whose folded kernel is below
  `DEAD_CHANNEL` of the layer's largest are set to zero. Exact up to float rounding (and the
  dead channels' < 1e-5 share). -> the number of convolutions folded."""
  g, inits, cons, outputs = _index(model)
  dead: set[int] = set()
  folded = 0
  for conv in list(g.node):
    if conv.op_type != "Conv" or len(conv.input) < 2 or conv.input[1] not in inits:
      continue
    has_bias = len(conv.input) > 2 and conv.input[2] != ""
    if has_bias and conv.input[2] not in inits:
      continue
    w = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
    cout = w.shape[0]
    b = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if has_bias else None
    scale, shift, tail, chain = np.ones(cout), np.zeros(cout), conv.output[0], []
    while tail not in outputs:
      users = cons.get(tail, [])
      if len(users) != 1:
        break
      n = users[0]
      if n.op_type not in ("Sub", "Mul", "Add", "Div") or list(n.input[:1]) != [tail]:
        break
      if len(n.input) != 2 or n.input[1] not in inits:
        break
      c = _per_channel(numpy_helper.to_array(inits[n.input[1]]), cout)
      if c is None or (n.op_type == "Div" and not np.all(c)):
        break
      if n.op_type == "Sub":
        shift = shift - c
      elif n.op_type == "Add":
        shift = shift + c
      elif n.op_type == "Mul":
        scale, shift = scale * c, shift * c
      else:
        scale, shift = scale / c, shift / c
      chain.append(n)
      tail = n.output[0]
    if not chain:
      continue
    w = w * scale.reshape(-1, *[1] * (w.ndim - 1))
    largest = np.abs(w).reshape(cout, -1).max(axis=1)
    w[largest < DEAD_CHANNEL * largest.max()] = 0.0
    bias = (b if b is not None else np.zeros(cout)) * scale + shift
    wname, bname = f"{conv.name}_kernel_folded", f"{conv.name}_bias_folded"
    g.initializer.extend(
        [
            numpy_helper.from_array(w.astype(np.float32), wname),
            numpy_helper.from_array(bias.astype(np.float32), bname),
        ]
    )
    x = conv.input[0]
    del conv.input[:]
    conv.input.extend([x, wname, bname])
    conv.output[0] = tail
    dead.update(id(n) for n in chain)
    folded += 1
  _drop_nodes_and_unused(g, dead)
  return folded


def _float_scalar(inits: dict, name: str) -> float | None:
  if name not in inits:
    return None
  a = numpy_helper.to_array(inits[name])
  return float(a.reshape(-1)[0]) if a.size == 1 and a.dtype == np.float32 else None


def relu_to_clip(model: onnx.ModelProto) -> int:
  """Max(x, lo) [then Min(., hi)] of float32 scalar constants (ReLU, ReLU6) -> one Clip, which
  the quantizer fuses with the convolution before it. -> the number rewritten."""
  g, inits, cons, outputs = _index(model)
  dead: set[int] = set()
  done = 0
  for mx in list(g.node):
    if mx.op_type != "Max" or len(mx.input) != 2:
      continue
    consts = [_float_scalar(inits, i) for i in mx.input]
    if sum(c is not None for c in consts) != 1:
      continue
    lo = next(c for c in consts if c is not None)
    x = mx.input[consts.index(None)]
    hi, out = None, mx.output[0]
    users = cons.get(out, [])
    if len(users) == 1 and users[0].op_type == "Min" and out not in outputs:
      other = [i for i in users[0].input if i != out]
      if len(other) == 1 and _float_scalar(inits, other[0]) is not None:
        hi, out = _float_scalar(inits, other[0]), users[0].output[0]
        dead.add(id(users[0]))
    lo_name = f"{mx.name}_clip_min"
    g.initializer.append(numpy_helper.from_array(np.asarray(lo, np.float32), lo_name))
    inputs = [x, lo_name]
    if hi is not None:
      hi_name = f"{mx.name}_clip_max"
      g.initializer.append(numpy_helper.from_array(np.asarray(hi, np.float32), hi_name))
      inputs.append(hi_name)
    mx.CopyFrom(helper.make_node("Clip", inputs, [out], name=f"{mx.name}_clip"))
    done += 1
  _drop_nodes_and_unused(g, dead)
  return done


def feature_nodes(model: onnx.ModelProto, op_types: Sequence[str] = INT8_OPS) -> list[str]:
  """The nodes of `op_types` that feed the adapter's output: everything from the input up to and
  including the first MatMul with a constant matrix (the adapter; the graph is in topological
  order). Without one: every node of those types."""
  g = model.graph
  inits = _initializers(g)
  producer = {o: n for n in g.node for o in n.output}
  adapter = next((n for n in g.node if n.op_type == "MatMul" and n.input[1] in inits), None)
  if adapter is None:
    return [n.name for n in g.node if n.op_type in op_types]
  seen: set[str] = set()
  stack = [adapter]
  while stack:
    n = stack.pop()
    if n.name in seen:
      continue
    seen.add(n.name)
    stack.extend(producer[i] for i in n.input if i in producer)
  return [n.name for n in g.node if n.name in seen and n.op_type in op_types]


# ----------------------------------------------------------------------------- the precisions


def to_fp16(model: onnx.ModelProto, backbone: str = "") -> tuple[onnx.ModelProto, dict]:
  """The model with its weights of two or more dimensions above 1 stored as float16, each cast to
  float32 by a Cast node in front of the graph. A weight beyond float16's range is refused."""
  model = _copy(model)
  g = model.graph
  casts, tensors, converted, kept = [], [], 0, 0
  for t in g.initializer:
    a = numpy_helper.to_array(t)
    if a.dtype != np.float32 or sum(d > 1 for d in a.shape) < 2:
      tensors.append(t)
      kept += a.nbytes if a.dtype == np.float32 else 0
      continue
    big = float(np.abs(a).max()) if a.size else 0.0
    if big > FP16_MAX:
      raise errors.UserValueError(
          f"--precision=fp16: the {backbone or 'model'}'s weight {t.name} holds values up to "
          f"{big:.3g}, beyond float16's range ({FP16_MAX:.0f}): export --precision=fp32 or int8"
      )
    tensors.append(numpy_helper.from_array(a.astype(np.float16), f"{t.name}_fp16"))
    casts.append(
        helper.make_node(
            "Cast", [f"{t.name}_fp16"], [t.name], to=onnx.TensorProto.FLOAT, name=f"{t.name}_cast"
        )
    )
    converted += 1
  del g.initializer[:]
  g.initializer.extend(tensors)
  nodes = casts + list(g.node)
  del g.node[:]
  g.node.extend(nodes)
  info = {
      "weights": f"{converted} weights of two or more dimensions above 1 stored as float16, "
      "cast to float32 in the graph; vectors and scalars float32",
      "compute": "float32 (the runtimes fold the casts)",
  }
  return model, info


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
  out = onnx.ModelProto()
  out.CopyFrom(model)
  return out


@contextlib.contextmanager
def _quiet_quantizer():
  """The quantizer logs advice and progress at INFO/WARNING: not the export's output."""
  root = logging.getLogger()
  level = root.level
  root.setLevel(logging.ERROR)
  try:
    yield
  finally:
    root.setLevel(level)


class _Reader:
  """The calibration images as onnxruntime's CalibrationDataReader wants them: one feed per
  batch of `BATCH` images (the thresholds inputs are fed too; no quantised node reads them)."""

  def __init__(self, images: np.ndarray):
    self._feeds = iter(
        [
            {
                "images": np.ascontiguousarray(images[i : i + BATCH]),
                "image_threshold": np.asarray(0.0, np.float32),
                "pixel_threshold": np.asarray(0.0, np.float32),
            }
            for i in range(0, len(images), BATCH)
        ]
    )

  def get_next(self):
    return next(self._feeds, None)

  def __iter__(self):
    return self

  def __next__(self):
    item = self.get_next()
    if item is None:
      raise StopIteration
    return item


def to_int8(
    model: onnx.ModelProto, calibration: np.ndarray, backbone: str = ""
) -> tuple[onnx.ModelProto, dict]:
  """The model quantised to int8 (module doc), its activation ranges calibrated on
  `calibration` (uint8 crops [N, crop, crop, 3])."""
  from onnxruntime import quantization as q  # noqa: PLC0415 - export-time tooling only
  from onnxruntime.quantization.shape_inference import quant_pre_process  # noqa: PLC0415

  if not len(calibration):
    raise errors.UserValueError(
        "--precision=int8: the calibration set holds no images (the run's training split is "
        "empty, or --calibration_images=0): give --calibration_images >= 1 of a run with "
        "normal training images, or export --precision=fp16"
    )
  with tempfile.TemporaryDirectory(prefix="cras_jax_int8_") as tmp, _quiet_quantizer():
    src, pre, out = (os.path.join(tmp, f) for f in ("fp32.onnx", "pre.onnx", "int8.onnx"))
    onnx.save(model, src)
    try:
      quant_pre_process(src, pre, skip_symbolic_shape=True)
    except Exception as e:  # noqa: BLE001 - the tool's own error, named
      raise _no_int8(backbone, f"onnxruntime's pre-processing failed: {e}") from None
    prepared = onnx.load(pre)
    folded = fold_conv_affine(prepared)
    clips = relu_to_clip(prepared)
    nodes = feature_nodes(prepared)
    convs = [n.name for n in prepared.graph.node if n.op_type == "Conv" and n.name in nodes]
    if not convs:
      raise _no_int8(backbone, "its graph has no convolution before the adapter to quantise")
    onnx.save(prepared, pre)
    try:
      q.quantize_static(
          pre,
          out,
          _Reader(calibration),
          quant_format=q.QuantFormat.QDQ,
          op_types_to_quantize=list(INT8_OPS),
          nodes_to_quantize=nodes,
          per_channel=True,
          reduce_range=False,
          activation_type=q.QuantType.QUInt8,
          weight_type=q.QuantType.QInt8,
          calibrate_method=q.CalibrationMethod.MinMax,
      )
    except Exception as e:  # noqa: BLE001 - the tool's own error, named
      raise _no_int8(backbone, f"onnxruntime's quantizer failed: {e}") from None
    quantised = onnx.load(out)
  foreign = {n.domain for n in quantised.graph.node if n.domain not in ("", "ai.onnx")}
  if foreign:
    raise _no_int8(backbone, f"the quantizer wrote operators of domains {sorted(foreign)}")
  # the optimiser declares every domain it knows; the graph uses the standard one alone
  standard = [o for o in quantised.opset_import if o.domain in ("", "ai.onnx")]
  del quantised.opset_import[:]
  quantised.opset_import.extend(standard)
  if [o.version for o in standard] != [model.opset_import[0].version]:
    raise _no_int8(backbone, f"the quantizer changed the opset to {list(standard)}")
  info = {
      "tool": "onnxruntime.quantization.quantize_static",
      "format": "QDQ",
      "weights": "int8, symmetric, per output channel",
      "activations": "uint8, asymmetric, per tensor",
      "calibration_method": "MinMax",
      "reduce_range": False,
      "rewrites": {
          "quant_pre_process": "onnxruntime's basic optimisation (layout transposes removed)",
          "convolutions_folded": folded,
          "relu_as_clip": clips,
      },
      "quantised_nodes": len(nodes),
      "quantised_convolutions": len(convs),
      "kept_float32": "the matching (class centres and nearest patch), the discriminator, the "
      "anomaly map's upsampling and smoothing, the normalisation and the thresholds",
  }
  return quantised, info


def _no_int8(backbone: str, why: str) -> errors.UserValueError:
  return errors.UserValueError(
      f"--precision=int8: the {backbone or 'model'} backbone cannot be quantised here ({why}); "
      f"export --precision=fp16 or fp32"
  )


# ----------------------------------------------------------------------------- normalisation


def normalisation_names(model: onnx.ModelProto, loc, scale) -> tuple[str, str] | None:
  """The names of the initializers holding the per-class normalisation (exactly `loc` and
  `scale` as float32 [K], each read only by Gather/GatherND nodes: indexed by the matched
  class), or None when they cannot be told apart from other constants."""
  cons = _consumers(model.graph)
  names = []
  for value in (loc, scale):
    want = np.asarray(value, np.float32)
    found = [
        t.name
        for t in model.graph.initializer
        if tuple(t.dims) == want.shape
        and t.data_type == onnx.TensorProto.FLOAT
        and np.array_equal(numpy_helper.to_array(t), want)
        and all(n.op_type in ("Gather", "GatherND") for n in cons.get(t.name, [None]) if n)
        and cons.get(t.name)
    ]
    if len(found) != 1:
      return None
    names.append(found[0])
  return (names[0], names[1]) if names[0] != names[1] else None


def set_initializer(model: onnx.ModelProto, name: str, value) -> None:
  """Replaces initializer `name`'s value (same shape and dtype)."""
  for t in model.graph.initializer:
    if t.name == name:
      old = numpy_helper.to_array(t)
      new = np.asarray(value, old.dtype).reshape(old.shape)
      t.CopyFrom(numpy_helper.from_array(new, name))
      return
  raise KeyError(name)


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
