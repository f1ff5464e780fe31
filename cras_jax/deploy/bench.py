"""Images/s of the exported scorer in three runtimes, in one process: the JAX export's function
(jitted), onnxruntime and OpenVINO running its ONNX form (`cras_jax.deploy_bench`).

Random backbone weights and centres (the speed does not depend on the values); the setups are
population_bench's (the demo's Lite0 at 160 px, the paper's WideResNet50-2 at 288 px). Share
of the peak: XLA's FLOP count of the function per image times images/s, over the float32
matmul rate measured in the same run (`probes.matmul_peak`)."""

from __future__ import annotations

import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from cras_jax.deploy import exporting, onnx_export, run_onnx
from cras_jax.perf import population_bench, probes
from cras_jax.runs import trained
from cras_jax.scoring import thresholds

RUNTIMES = ("jax", "onnxruntime", "openvino")


def setup_run(setup: str) -> tuple[trained.Run, thresholds.Thresholds]:
  """A run of `setup` with random weights and centres, and identity normalisation."""
  cfg = population_bench._config(setup, 8)  # noqa: SLF001 - the same setups
  k = population_bench.NUM_CLASSES
  names = [f"class{i}" for i in range(k)]
  spec, devices, state = trained.initial(cfg, k)
  rng = np.random.default_rng(0)
  state = state.replace(centres=jnp.asarray(rng.normal(size=state.centres.shape), jnp.float32))
  run = trained.Run(cfg, spec, devices, state, {"class_names": names, "run_id": "bench"})
  thr = thresholds.Thresholds(names, np.zeros(k, np.float32), np.ones(k, np.float32), 0.5, 0.5)
  return run, thr


def _timed(call, min_seconds: float) -> float:
  """Seconds per call: one warm call, then calls until `min_seconds` (at least 3)."""
  call()
  n, t0 = 0, time.perf_counter()
  while n < 3 or time.perf_counter() - t0 < min_seconds:
    call()
    n += 1
  return (time.perf_counter() - t0) / n


def measure(setup: str, batch_sizes, runtimes=RUNTIMES, min_seconds: float = 3.0) -> list[dict]:
  """-> rows {setup, runtime, batch, images_per_s, vs_jax, gflop_per_image, peak_share}."""
  run, thr = setup_run(setup)
  crop = int(run.config.data.crop)
  scorer, tree = exporting.score_tree(run, thr)
  leaves, treedef = jax.tree.flatten(tree)
  fn = jax.jit(exporting.make_score_fn(scorer.step_fn, treedef))
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "model.onnx")
    onnx_export.export_onnx(run, thr, path)
    models = {}
    for r in runtimes:
      if r == "jax":
        continue
      try:
        models[r] = run_onnx.load(path, r)
      except run_onnx.ExportError as e:  # a runtime that is not installed: its rows say so
        models[r] = str(e)
  peak = probes.matmul_peak(jax.devices(), 2048, "float32", 3, 0.5)["flops_per_s"]
  rng = np.random.default_rng(0)
  rows = []
  for bs in batch_sizes:
    images = rng.integers(0, 256, (bs, crop, crop, 3), dtype=np.uint8)
    t = np.float32(0.5)
    compiled = fn.lower(leaves, images, t, t).compile()
    flops = (probes.cost_flops(compiled) or float("nan")) / bs
    base = None
    for r in runtimes:
      row = {"setup": setup, "runtime": r, "batch": bs, "gflop_per_image": flops / 1e9}
      if r == "jax":
        sec = _timed(lambda: jax.block_until_ready(compiled(leaves, images, t, t)), min_seconds)
      elif isinstance(models[r], str):
        rows.append({**row, "missing": models[r]})
        continue
      else:
        model = models[r]
        sec = _timed(lambda model=model: model["run"](images, t, t), min_seconds)
      ips = bs / sec
      base = ips if r == "jax" else base
      rows.append(
          {
              **row,
              "images_per_s": ips,
              "vs_jax": ips / base if base else None,
              "peak_share": ips * flops / peak,
              "peak_flops_per_s": peak,
          }
      )
  return rows


def markdown(rows: list[dict]) -> str:
  lines = [
      "| setup | runtime | batch | images/s | vs JAX | GFLOP/image | share of peak |",
      "|---|---|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    if "missing" in r:
      lines.append(f"| {r['setup']} | {r['runtime']} | {r['batch']} | not installed | | | |")
      continue
    lines.append(
        f"| {r['setup']} | {r['runtime']} | {r['batch']} | {r['images_per_s']:.1f} | "
        f"{r['vs_jax']:.2f} | {r['gflop_per_image']:.2f} | {100 * r['peak_share']:.0f}% |"
    )
  return "\n".join(lines) + "\n"
