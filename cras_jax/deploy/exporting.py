"""The portable export's library: the scoring function of a run serialised with `jax.export`
for a symbolic batch size, its weights and meta written as one .npz file with a content
checksum (the file format is described in cras_jax/export.py, the command; the checksum and
the loader are `cras_jax.run_exported`'s, which imports only jax and numpy)."""

from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import export as jax_export

import cras_jax
from cras_jax.base import errors, fileio
from cras_jax.deploy import run_exported
from cras_jax.results import tables as results
from cras_jax.runs import specs, trained
from cras_jax.scoring import scoring

FORMAT = "cras_jax.exported_scoring"
FORMAT_VERSION = 2  # 2: a content checksum, the run id and config in the meta
OUTPUTS = {
    "scores": "float32 [b]: image anomaly score (as the evaluation)",
    "maps": "float32 [b, crop, crop]: anomaly map",
    "patch": "float32 [b, h, w]: patch scores (discriminator probabilities)",
    "cls": "int32 [b]: matched class (index into class_names)",
    "normalised_scores": "float32 [b]: (score - loc[cls]) / scale[cls]",
    "is_anomaly": "uint8 [b]: normalised_scores >= image_threshold (all 0 when the threshold "
    "is NaN: no decision)",
    "masks": "uint8 [b, crop, crop]: (maps - loc[cls]) / scale[cls] >= pixel_threshold (all 0 "
    "when the threshold is NaN: no decision)",
}


def make_score_fn(predict_step, treedef, keep=None, shapes=None):
  """score(weights: list, images, image_threshold, pixel_threshold) -> dict (module doc).

  predict_step: a scorer's (unjitted) step, (scoring variables, images) -> dict.
  keep: the indices of the leaves passed in `weights` (others are unused by the function and
  replaced by zeros of `shapes`)."""

  def score(weights, images, image_threshold, pixel_threshold):
    if keep is None:
      leaves = list(weights)
    else:
      given = dict(zip(keep, weights))
      leaves = [
          given[i] if i in given else jnp.zeros(s.shape, s.dtype) for i, s in enumerate(shapes)
      ]
    w = jax.tree.unflatten(treedef, leaves)
    out = predict_step(w["svars"], images)
    loc, scale = w["loc"][out["cls"]], w["scale"][out["cls"]]
    z = (out["scores"] - loc) / scale
    zmaps = (out["maps"] - loc[:, None, None]) / scale[:, None, None]
    return {
        **out,
        "normalised_scores": z,
        "is_anomaly": (z >= image_threshold).astype(jnp.uint8),
        "masks": (zmaps >= pixel_threshold).astype(jnp.uint8),
    }

  return score


def used_weights(fn, leaf_shapes, crop: int) -> list[int]:
  """Indices of the weights that `fn`'s traced program reads."""
  closed = jax.make_jaxpr(fn)(
      [jax.ShapeDtypeStruct(s.shape, s.dtype) for s in leaf_shapes],
      jax.ShapeDtypeStruct((1, crop, crop, 3), jnp.uint8),
      jnp.float32(0),
      jnp.float32(0),
  )
  read = {id(v) for eqn in closed.jaxpr.eqns for v in eqn.invars}
  read |= {id(v) for v in closed.jaxpr.outvars}
  return [i for i, v in enumerate(closed.jaxpr.invars[: len(leaf_shapes)]) if id(v) in read]


def _export(fn, leaf_shapes, crop: int, platforms):
  (b,) = jax_export.symbolic_shape("b", constraints=("b >= 1",))
  args = (
      [jax.ShapeDtypeStruct(s.shape, s.dtype) for s in leaf_shapes],
      jax.ShapeDtypeStruct((b, crop, crop, 3), jnp.uint8),
      jax.ShapeDtypeStruct((), jnp.float32),
      jax.ShapeDtypeStruct((), jnp.float32),
  )
  return jax_export.export(jax.jit(fn), platforms=platforms)(*args)


def export_run(run: trained.Run, thr, output: str, platforms=("cpu", "cuda")) -> dict:
  """Exports a loaded run (`trained.load_run`) with thresholds `thr` (`thresholds.Thresholds`)
  to `output` (.npz). Returns the meta."""
  t0 = time.time()
  scorer, tree = score_tree(run, thr)
  leaves, treedef = jax.tree.flatten(tree)
  leaves = [np.asarray(x) for x in leaves]
  shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
  crop = int(run.config.data.crop)
  platforms = tuple(platforms)
  # Only the weights the function reads are stored and passed (a shape-polymorphic export
  # keeps every argument, used or not). The training state already leaves out the backbone's
  # unused stages (`ModelSpec.used_backbone`); this keeps any other unread leaf out.
  keep = used_weights(make_score_fn(scorer.step_fn, treedef), shapes, crop)
  exp = _export(
      make_score_fn(scorer.step_fn, treedef, keep, shapes),
      [shapes[i] for i in keep],
      crop,
      platforms,
  )
  blob = exp.serialize()
  kept = [leaves[i] for i in keep]
  meta = {
      "format": FORMAT,
      "format_version": FORMAT_VERSION,
      "function": "score(weights, images, image_threshold, pixel_threshold) -> dict",
      **run_meta(run, thr),
      "num_weights": len(kept),
      "weights_bytes": int(sum(x.nbytes for x in kept)),
      "weights_dropped_unused": len(leaves) - len(kept),
      "platforms": list(platforms),
  }
  meta["checksum"] = {
      # over the meta as loading reads it back (JSON: tuples as lists, keys as strings)
      "sha256": run_exported.content_checksum(bytes(blob), kept, json.loads(json.dumps(meta))),
      "covers": run_exported.CHECKSUM_COVERS,
  }
  arrays = {
      "exported": np.frombuffer(bytes(blob), np.uint8),
      "meta": np.frombuffer(json.dumps(meta).encode("utf-8"), np.uint8),
  }
  arrays.update({f"w{i:06d}": x for i, x in enumerate(kept)})
  os.makedirs(os.path.dirname(os.path.abspath(output)) or ".", exist_ok=True)
  write_npz(output, arrays)
  size = os.path.getsize(output)
  print(
      f"exported {len(kept)} weight arrays ({meta['weights_bytes'] / 2**20:.1f} MiB; "
      f"{meta['weights_dropped_unused']} unused left out) and the scoring function "
      f"({len(blob) / 1024:.0f} KiB, platforms {', '.join(platforms)}, batch size symbolic) "
      f"to {output}: {size / 2**20:.2f} MiB in {time.time() - t0:.1f}s",
      flush=True,
  )
  return meta


def run_meta(run: trained.Run, thr) -> dict:
  """What every export records of its run: class names, input and preprocessing, outputs,
  thresholds, normalisation, step, backbone, run id, config and the versions exporting."""
  cfg = run.config
  crop = int(cfg.data.crop)
  limits = specs.limits(cfg)
  image, pixel = _finite(thr.image_threshold), _finite(thr.pixel_threshold)
  absent = [k for k, v in (("image", image), ("pixel", pixel)) if v is None]
  note = (
      f"no stored {' and '.join(absent)} threshold: the function gets NaN there and decides "
      f"nothing (is_anomaly / masks all 0 mean 'not decided', not 'normal'); pass "
      f"--image_threshold / --pixel_threshold to the scorer, or calibrate the run (python -m "
      f"cras_jax.predict --calibrate) and export it again"
  )
  return {
      "class_names": run.class_names,
      "input": {
          "shape": ["b", crop, crop, 3],
          "dtype": "uint8",
          "colour": "RGB",
          "resize": int(cfg.data.resize),
          "crop": crop,
          "preprocessing": "8-bit RGB (grey replicated, alpha dropped); shorter side "
          "resized to `resize` (the other int(resize * long / short)) "
          "with PIL bilinear; centre crop crop x crop (torchvision "
          "Resize + CenterCrop); cras_jax.data.preprocess.load_example",
          # files over these are refused unread, by predict and run_onnx alike
          "max_image_pixels": limits.max_pixels,
          "max_aspect_ratio": limits.max_aspect_ratio,
          "limits_rule": "cras_jax.base.image_limits.problem",
      },
      "outputs": OUTPUTS,
      "thresholds": {
          # null: absent (the run has no thresholds.json, or this one none), never 0
          "image": image,
          "pixel": pixel,
          "absent": absent,
          **({"note": note} if absent else {}),
          "source": thr.source,
          "decision": "anomalous where normalised value >= threshold",
      },
      "normalisation": {
          "loc": np.asarray(thr.loc).tolist(),
          "scale": np.asarray(thr.scale).tolist(),
          "definition": "z = (s - loc[c]) / scale[c], c = matched class",
      },
      "step": int(run.state.step),
      "score_mode": cfg.model.score_mode,
      "backbone": cfg.model.backbone,
      # Where it came from: the run (its id and config) and the versions that exported it.
      "run_id": run.meta.get("run_id"),
      "config": run.meta.get("config"),
      "versions": {**results.versions(), "cras_jax": cras_jax.__version__, "jax": jax.__version__},
  }


def score_tree(run: trained.Run, thr) -> tuple[scoring.Scorer, dict]:
  """(the run's per-image scorer, the tree its exported function reads: the scorer's prepared
  variables and the per-class normalisation), the weights checked finite."""
  scorer = scoring.Scorer.for_run(run, per_image=True)
  # The scorer's variables (folded BatchNorm, per-centre terms), prepared once, are stored;
  # the exported function is its predict step on them.
  tree = {
      "svars": jax.device_get(scorer.svars),
      "loc": np.asarray(thr.loc, np.float32),
      "scale": np.asarray(thr.scale, np.float32),
  }
  leaves = [np.asarray(x) for x in jax.tree.leaves(tree)]
  for x in leaves:
    if x.dtype.kind not in "fiub":  # e.g. bfloat16 (kind 'V') has no portable form
      raise TypeError(f"cannot store a weight of dtype {x.dtype} in a portable file")
  check_finite_weights(
      [p for p, _ in jax.tree_util.tree_leaves_with_path(tree)],
      leaves,
      f"the run's weights (step {int(run.state.step)})",
  )
  return scorer, tree


def write_npz(output: str, arrays: dict) -> None:
  """`np.savez` to a temporary name renamed into place: `output` is complete or untouched,
  and a failed write (a full disk) leaves no temporary behind."""
  with fileio.atomic_write(output, "wb") as f:
    np.savez(f, **arrays)


def check_finite_weights(names, leaves, what: str) -> None:
  """A `UserValueError` naming the weights with NaN or inf: such a model scores every image
  -inf (all "normal") instead of failing."""
  bad = [
      jax.tree_util.keystr(n) if not isinstance(n, str) else n
      for n, x in zip(names, leaves)
      if np.asarray(x).dtype.kind == "f" and not np.isfinite(np.asarray(x)).all()
  ]
  if bad:
    raise errors.UserValueError(
        f"{what}: {len(bad)} weight array(s) hold NaN or inf ({', '.join(bad[:3])}"
        f"{', ...' if len(bad) > 3 else ''}); the model would score every image wrongly. "
        f"Retrain, or export an earlier checkpoint."
    )


def _finite(x):
  return float(x) if x is not None and math.isfinite(x) else None


# ----------------------------------------------------------------------------- command line

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # what jax.export lowers for


def check_output_and_platforms(output: str, platforms) -> None:
  """A `UserValueError` for an output that is a folder or in a missing folder, and for
  platforms jax.export does not know (before anything is loaded or written)."""
  bad = [p for p in platforms or [] if p not in PLATFORMS]
  if not platforms or bad:
    raise errors.UserValueError(
        f"--platforms={','.join(platforms or [])}: "
        + (f"unknown {', '.join(map(repr, bad))}; " if bad else "")
        + f"choose from {', '.join(PLATFORMS)}"
    )
  if os.path.isdir(output) or output.endswith(("/", os.sep)):
    raise errors.UserValueError(
        f"--output={output!r} is a folder; give a file name such as "
        f"{os.path.join(output, 'exported.npz')!r}"
    )
  parent = os.path.dirname(os.path.abspath(output))
  if not os.path.isdir(parent):
    raise errors.UserValueError(f"--output={output!r}: the folder {parent!r} does not exist")
