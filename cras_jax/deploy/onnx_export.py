"""The scoring function of a run as one ONNX file, scored without JAX (`cras_jax.run_onnx`).

The graph is the same function `cras_jax.export` serialises with jax.export (backbone, adapter,
matching, discriminator, anomaly map with its smoothing, normalisation, both decisions),
converted primitive by primitive (`onnx_graph`; docs/deploy.md), its weights initializers,
its batch dimension symbolic. The run's meta (the export's, plus the graph's inputs and
outputs) is the model's metadata entry "cras_jax.meta"; "cras_jax.sha256" is a SHA-256 over the
file's bytes with that entry's value written as 64 zeros (`run_onnx.file_checksum`).
"""

from __future__ import annotations

import copy
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import onnx
from jax import export as jax_export

import cras_jax
from cras_jax import data as data_lib
from cras_jax.base import errors, fileio
from cras_jax.data import mvtec
from cras_jax.deploy import compress, exporting, onnx_graph, run_onnx
from cras_jax.engine import steps
from cras_jax.runs import trained
from cras_jax.scoring import ad2_evaluation, threshold_fit, thresholds

# What the graph computes in, whatever the run's model.dtype: bfloat16 is no type of ONNX's
# Conv at opset 18, and onnxruntime's CPU provider has no bfloat16 MatMul, so a bfloat16 run
# is traced in float32 on the same weights (the training state holds them in float32
# whatever model.dtype is).
COMPUTE_DTYPE = "float32"


def graph_run(run: trained.Run) -> trained.Run:
  """The run as its ONNX graph is traced: the backbone's "xla" kernels (`model.kernels`:
  native grouped convolutions, which ONNX runtimes run fast, instead of the XLA:CPU-tuned
  form of shifted slices, about 2x slower in onnxruntime) and float32 compute
  (`model.dtype`, `COMPUTE_DTYPE`). The same weights and function; the sums in another order
  and, for a bfloat16 run, without bfloat16's rounding."""
  if run.spec.kernels == "xla" and run.config.model.dtype == COMPUTE_DTYPE:
    return run
  cfg = copy.deepcopy(run.config)
  cfg.model.kernels = "xla"
  cfg.model.dtype = COMPUTE_DTYPE
  spec = steps.ModelSpec(cfg, run.spec.num_classes, run.meta.get("grid"))
  return run._replace(config=cfg, spec=spec)


def dtype_meta(run: trained.Run) -> dict:
  """What the meta says of the graph's dtype against the run's."""
  out = {"compute_dtype": COMPUTE_DTYPE, "run_dtype": str(run.config.model.dtype)}
  if out["run_dtype"] != COMPUTE_DTYPE:
    out["dtype_note"] = (
        f"the run computes in {out['run_dtype']} (model.dtype); ONNX runtimes lack "
        f"{out['run_dtype']} kernels for most operators, so this graph computes in "
        f"{COMPUTE_DTYPE} with the run's weights: its outputs differ from the run's JAX "
        f"scorer's by {out['run_dtype']} rounding, and a decision may differ "
        f"for an image that close to a threshold"
    )
  return out


def score_graph(run: trained.Run, thr) -> onnx.ModelProto:
  """The run's scoring function as an ONNX model (no metadata yet)."""
  run = graph_run(run)
  scorer, tree = exporting.score_tree(run, thr)
  _, treedef = jax.tree.flatten(tree)
  score = exporting.make_score_fn(scorer.step_fn, treedef)
  crop = int(run.config.data.crop)
  (b,) = jax_export.symbolic_shape("b", constraints=("b >= 1",))

  def fn(weights, images, image_threshold, pixel_threshold):
    return score(jax.tree.leaves(weights), images, image_threshold, pixel_threshold)

  return onnx_graph.to_onnx(
      fn,
      tree,
      {
          "images": jax.ShapeDtypeStruct((b, crop, crop, 3), jnp.uint8),
          "image_threshold": jax.ShapeDtypeStruct((), jnp.float32),
          "pixel_threshold": jax.ShapeDtypeStruct((), jnp.float32),
      },
      graph_name="cras_jax_score",
      doc="score(images, image_threshold, pixel_threshold): cras_jax's scoring function",
  )


def export_onnx(
    run: trained.Run,
    thr,
    output: str,
    precision: str = "fp32",
    images: compress.CheckImages | None = None,
    max_flip_rate: float = compress.DEFAULT_MAX_FLIP_RATE,
    force: bool = False,
) -> dict:
  """Writes the run's scoring function with thresholds `thr` to `output` (.onnx), complete
  or not at all. Returns the meta.

  precision fp16 / int8: the float32 graph compressed and checked (`compress.compress`) on
  `images` (`check_images`), refused beyond `max_flip_rate` unless `force`."""
  t0 = time.time()
  model = score_graph(run, thr)
  model.producer_name = "cras_jax"
  model.producer_version = cras_jax.__version__
  meta = {
      "format": run_onnx.FORMAT,
      "format_version": run_onnx.FORMAT_VERSION,
      "function": "score(images, image_threshold, pixel_threshold) -> outputs",
      **exporting.run_meta(run, thr),
      "opset": onnx_graph.OPSET,
      "backbone_kernels": "xla",  # native grouped convolutions (`graph_run`)
      **dtype_meta(run),
      "onnx_inputs": {
          "images": "uint8 [b, crop, crop, 3] RGB, preprocessed as `input`",
          "image_threshold": "float32 [] (normalised units); NaN flags nothing",
          "pixel_threshold": "float32 [] (normalised units); NaN flags nothing",
      },
  }
  meta["versions"]["onnx"] = onnx.__version__
  onnx.checker.check_model(model)
  if precision == "fp32":
    data = stamp(model, meta)
  else:
    if images is None:
      raise ValueError(f"precision {precision}: give the calibration and check images")
    data, meta = compress.compress(model, meta, precision, images, max_flip_rate, force)
    print(compress.summary(meta), flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(output)) or ".", exist_ok=True)
  with fileio.atomic_write(output, "wb") as f:
    f.write(data)
  shape = (
      f"opset {onnx_graph.OPSET}, {len(model.graph.node)} nodes, "
      f"{len(model.graph.initializer)} initializers"
      if precision == "fp32"
      else f"{precision}, opset {onnx_graph.OPSET}"
  )
  print(
      f"exported the scoring function as ONNX ({shape}, batch size symbolic) to {output}: "
      f"{len(data) / 2**20:.2f} MiB in {time.time() - t0:.1f}s",
      flush=True,
  )
  return meta


# ----------------------------------------------------------------------------- check images


def _split_field(source, field: str) -> list:
  """One field of every example of a split, from its metadata where it has it (no image is
  decoded), else read from the examples."""
  m = mvtec.split_metadata(source)
  if m is not None and field in m:
    values = list(m[field])
  else:
    values = [
        x
        for i in range(0, len(source), 64)
        for x in data_lib.get_batch(source, np.arange(i, min(i + 64, len(source))), [field])[field]
    ]
  return [v.decode("utf-8") if isinstance(v, bytes) else v for v in values]


def _read(source, indices, keys=("image",)) -> dict:
  """`keys` of the examples `indices` of a split, read 64 at a time."""

  parts = [
      data_lib.get_batch(source, np.asarray(indices[i : i + 64]), list(keys))
      for i in range(0, len(indices), 64)
  ]
  return {
      k: [x for p in parts for x in p[k]]
      if isinstance(parts[0][k], list)
      else np.concatenate([p[k] for p in parts])
      for k in keys
  }


def interleaved(names, labels) -> list[int]:
  """Indices of a split in the order images are taken: within each class by the SHA-256 of the
  file name (`thresholds.name_hash`, as the thresholds' split), then one class after another
  in turn, so any first n hold the classes evenly."""
  labels = np.asarray(labels)
  queues = [
      sorted(
          np.flatnonzero(labels == k).tolist(),
          key=lambda i: (thresholds.name_hash(names[i]), names[i]),
      )
      for k in sorted(set(labels.tolist()))
  ]
  out = []
  for depth in range(max((len(q) for q in queues), default=0)):
    out += [q[depth] for q in queues if depth < len(q)]
  return out


def check_images(run: trained.Run, workdir: str, calibration_images: int) -> compress.CheckImages:
  """The images a compressed export is calibrated on (the first `calibration_images` of the
  run's normal training images, `interleaved`), checked on (the next ones, at most
  `compress.MAX_CHECK_IMAGES`; the test split's normal images when fewer than
  `compress.MIN_HELD_BACK` are left) and whose thresholds it re-fits (the split the run's
  thresholds came from)."""

  dataset = trained.load_run_dataset(run, workdir)
  train = dataset.train
  names = [str(n) for n in _split_field(train, "name")]
  order = interleaved(names, data_lib.class_indices(train)) if len(train) else []
  n_cal = min(int(calibration_images), len(order))
  cal_idx, rest = order[:n_cal], order[n_cal:]
  rule = (
      f"the first {n_cal} of the {len(order)} training images (all normal), taken class by "
      f"class in turn, each class in the order of the SHA-256 of the file name"
  )
  calibration = _read(train, cal_idx)["image"] if n_cal else np.zeros((0,), np.uint8)
  identity = compress.image_identity(calibration, [names[i] for i in cal_idx], "train", rule)
  val = getattr(dataset, "validation", None)
  split, fit, fit_rule = (
      (val, ad2_evaluation.fit_validation, "MVTec AD 2's validation rule (thresholds.json's)")
      if val is not None
      else (
          dataset.test,
          threshold_fit.fit,
          "thresholds.json's: normalisation from the test split's normal calibration half, "
          "F1-optimal thresholds on its calibration half",
      )
  )
  if len(rest) >= compress.MIN_HELD_BACK:
    held_idx = rest[: compress.MAX_CHECK_IMAGES]
    held = _read(train, held_idx)["image"]
    held_source = f"{len(held_idx)} training images not used for calibration"
  else:
    is_anomaly = np.asarray(_split_field(dataset.test, "is_anomaly"), np.int64)
    normal = np.flatnonzero(is_anomaly == 0)[: compress.MAX_CHECK_IMAGES]
    held = _read(dataset.test, normal.tolist())["image"] if len(normal) else np.zeros((0,))
    held_source = (
        f"the test split's {len(normal)} normal images (only {len(rest)} training images are "
        f"left after calibration, fewer than {compress.MIN_HELD_BACK})"
    )
  if not len(held):
    raise errors.UserValueError(
        f"--precision: no held-back normal image to check the compressed model on ({len(rest)} "
        f"training images left after --calibration_images={calibration_images}, and no normal "
        f"test image): lower --calibration_images"
    )
  keys = ("image", "label", "is_anomaly", "mask", "name")
  whole = _read(split, list(range(len(split))), keys) if len(split) else None
  images = None
  if whole is not None:
    whole["has_mask"] = data_lib.has_mask(split)
    images = compress.ThresholdImages(whole, fit, fit_rule)
  return compress.CheckImages(calibration, identity, held, held_source, images)


def stamp(model: onnx.ModelProto, meta: dict) -> bytes:
  """The model's bytes with `meta` and the checksum over them in its metadata."""
  return compress.stamp(model, meta)
