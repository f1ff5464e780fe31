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


def xla_kernels(run: trained.Run) -> trained.Run:
  """The run with the backbone's "xla" kernels (`model.kernels`): native grouped convolutions,
  which ONNX runtimes run fast, instead of the XLA:CPU-tuned form of shifted slices (about 2x
  slower in onnxruntime). The same weights and function; the sums in another order."""
  if run.spec.kernels == "xla":
    return run
  cfg = copy.deepcopy(run.config)
  cfg.model.kernels = "xla"
  spec = steps.ModelSpec(cfg, run.spec.num_classes, run.meta.get("grid"))
  return run._replace(config=cfg, spec=spec)


def score_graph(run: trained.Run, thr) -> onnx.ModelProto:
  """The run's scoring function as an ONNX model (no metadata yet)."""
  run = xla_kernels(run)
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
      "backbone_kernels": "xla",  # native grouped convolutions (`xla_kernels`)
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
