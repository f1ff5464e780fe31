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
import hashlib
import json
import os
import time

import jax
import jax.numpy as jnp
import onnx
from jax import export as jax_export

import cras_jax
from cras_jax.base import fileio
from cras_jax.deploy import exporting, onnx_graph, run_onnx
from cras_jax.engine import steps
from cras_jax.runs import trained

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


def export_onnx(run: trained.Run, thr, output: str) -> dict:
  """Writes the run's scoring function with thresholds `thr` to `output` (.onnx), complete
  or not at all. Returns the meta."""
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
  data = stamp(model, meta)
  os.makedirs(os.path.dirname(os.path.abspath(output)) or ".", exist_ok=True)
  with fileio.atomic_write(output, "wb") as f:
    f.write(data)
  print(
      f"exported the scoring function as ONNX (opset {onnx_graph.OPSET}, {len(model.graph.node)} "
      f"nodes, {len(model.graph.initializer)} initializers, batch size symbolic) to {output}: "
      f"{len(data) / 2**20:.2f} MiB in {time.time() - t0:.1f}s",
      flush=True,
  )
  return meta


def stamp(model: onnx.ModelProto, meta: dict) -> bytes:
  """The model's bytes with `meta` and the checksum over them in its metadata."""
  del model.metadata_props[:]
  onnx.helper.set_model_props(
      model, {run_onnx.META_KEY: json.dumps(meta), run_onnx.SUM_KEY: run_onnx.PLACEHOLDER}
  )
  data = model.SerializeToString()
  if data.count(run_onnx.PLACEHOLDER.encode()) != 1:
    raise RuntimeError("the checksum's placeholder occurs more than once in the serialised model")
  digest = hashlib.sha256(data).hexdigest()
  out = data.replace(run_onnx.PLACEHOLDER.encode(), digest.encode())
  assert run_onnx.file_checksum(out, digest) == digest
  return out
