"""Images/s of the exported scorer in three runtimes, in one process: the JAX export's function
(jitted), onnxruntime and OpenVINO running its ONNX form at each precision (fp32, fp16, int8:
`compress`) (`cras_jax.deploy_bench`).

`measure`: random backbone weights and centres (the speed does not depend on the values); the
setups are population_bench's (the demo's Lite0 at 160 px, the paper's WideResNet50-2 at 288
px); the int8 graph is calibrated on random images. Share of the peak: XLA's FLOP count of the
function per image times images/s, over the float32 matmul rate measured in the same run
(`probes.matmul_peak`).

`measure_run`: a trained run exported at each precision as `python -m cras_jax.export` does
(calibrated and checked on its own images, thresholds re-fitted), its test split scored by
run_onnx in each runtime: I-AUROC, P-AUROC and AUPRO (`results.tables.class_metrics`), the
share of test images decided otherwise than fp32 and the largest normalised score difference,
the file's size, and images/s and latency at each batch size.

A row whose runtime the export's check found wrong for that file (run_onnx refuses it there)
is timed all the same and marked."""

from __future__ import annotations

import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from cras_jax import data as data_lib
from cras_jax.deploy import compress, exporting, onnx_export, run_onnx
from cras_jax.perf import population_bench, probes
from cras_jax.results import tables
from cras_jax.runs import trained
from cras_jax.scoring import scoring, thresholds

RUNTIMES = ("jax", "onnxruntime", "openvino")
PRECISIONS = compress.PRECISIONS


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


def _random_images(crop: int) -> compress.CheckImages:
  """Random crops to calibrate and check a random-weights graph with (speed only)."""
  rng = np.random.default_rng(1)
  cal = rng.integers(0, 256, (16, crop, crop, 3), dtype=np.uint8)
  held = rng.integers(0, 256, (8, crop, crop, 3), dtype=np.uint8)
  identity = compress.image_identity(cal, [], "random", "16 random crops (speed only)")
  return compress.CheckImages(cal, identity, held, "8 random crops (speed only)")


def _export_all(run, thr, precisions, tmp: str, images) -> dict[str, str]:
  """precision -> the path of the run's ONNX export at it (compressed ones forced: a random
  model's check means nothing, and a trained run's was printed by the export)."""
  paths = {}
  for p in precisions:
    paths[p] = os.path.join(tmp, f"model_{p}.onnx")
    onnx_export.export_onnx(run, thr, paths[p], p, images if p != "fp32" else None, force=True)
  return paths


def _model(path: str, runtime: str) -> dict | str:
  """run_onnx's model of `path` in `runtime`, with "verified" (False where run_onnx refuses the
  file in that runtime), or the message when the runtime is not installed."""
  data, meta = run_onnx.read(path)
  try:
    model = run_onnx.from_bytes(data, meta, runtime, path=path)
  except run_onnx.ExportError as e:  # a runtime that is not installed: its rows say so
    return str(e)
  try:
    run_onnx.check_runtime(meta, runtime, path)
    model["verified"] = True
  except run_onnx.ExportError:
    model["verified"] = False
  return model


def measure(
    setup: str,
    batch_sizes,
    runtimes=RUNTIMES,
    min_seconds: float = 3.0,
    precisions=("fp32",),
) -> list[dict]:
  """-> rows {setup, precision, runtime, batch, images_per_s, ms_per_batch, vs_jax, file_mib,
  gflop_per_image, peak_share, verified}."""
  run, thr = setup_run(setup)
  crop = int(run.config.data.crop)
  scorer, tree = exporting.score_tree(run, thr)
  leaves, treedef = jax.tree.flatten(tree)
  fn = jax.jit(exporting.make_score_fn(scorer.step_fn, treedef))
  onnx_runtimes = [r for r in runtimes if r != "jax"]
  with tempfile.TemporaryDirectory() as tmp:
    paths = _export_all(run, thr, precisions, tmp, _random_images(crop))
    models = {(p, r): _model(paths[p], r) for p in precisions for r in onnx_runtimes}
    sizes = {p: os.path.getsize(paths[p]) / 2**20 for p in precisions}
  peak = probes.matmul_peak(jax.devices(), 2048, "float32", 3, 0.5)["flops_per_s"]
  rng = np.random.default_rng(0)
  rows = []
  for bs in batch_sizes:
    images = rng.integers(0, 256, (bs, crop, crop, 3), dtype=np.uint8)
    t = np.float32(0.5)
    compiled = fn.lower(leaves, images, t, t).compile()
    flops = (probes.cost_flops(compiled) or float("nan")) / bs
    base = None
    if "jax" in runtimes:
      sec = _timed(lambda: jax.block_until_ready(compiled(leaves, images, t, t)), min_seconds)
      base = bs / sec
      rows.append(_row(setup, "fp32", "jax", bs, sec, base, None, flops, peak, True))
    for p in precisions:
      for r in onnx_runtimes:
        model = models[(p, r)]
        if isinstance(model, str):
          rows.append({"setup": setup, "precision": p, "runtime": r, "batch": bs, "missing": model})
          continue
        sec = _timed(lambda model=model: model["run"](images, t, t), min_seconds)
        rows.append(_row(setup, p, r, bs, sec, base, sizes[p], flops, peak, model["verified"]))
  return rows


def _row(setup, precision, runtime, bs, sec, base, mib, flops, peak, verified) -> dict:
  ips = bs / sec
  return {
      "setup": setup,
      "precision": precision,
      "runtime": runtime,
      "batch": bs,
      "images_per_s": ips,
      "ms_per_batch": 1000 * sec,
      "vs_jax": ips / base if base else None,
      "file_mib": mib,
      "gflop_per_image": flops / 1e9,
      "peak_share": ips * flops / peak,
      "peak_flops_per_s": peak,
      "verified": bool(verified),
  }


def measure_run(
    workdir: str,
    precisions=PRECISIONS,
    runtimes=RUNTIMES[1:],
    batch_sizes=(1, 8),
    min_seconds: float = 3.0,
    calibration_images: int = compress.DEFAULT_CALIBRATION_IMAGES,
) -> list[dict]:
  """A trained run at each precision (module doc) -> rows {precision, runtime, i_auroc,
  p_auroc, aupro, flip_rate, flips, max_score_diff, file_mib, verified, images_per_s_b<n>,
  ms_b<n>}; metrics in [0, 1], against the fp32 file in onnxruntime."""

  run = trained.load_run(workdir)
  thr = scoring.load_thresholds(run, workdir)
  dataset = trained.load_run_dataset(run, workdir)
  test = data_lib.get_batch(dataset.test, np.arange(len(dataset.test)))
  test["has_mask"] = data_lib.has_mask(dataset.test)
  images = onnx_export.check_images(run, workdir, calibration_images)
  rows, base = [], None
  with tempfile.TemporaryDirectory() as tmp:
    paths = {}
    for p in precisions:
      paths[p] = os.path.join(tmp, f"model_{p}.onnx")
      onnx_export.export_onnx(run, thr, paths[p], p, images if p != "fp32" else None, force=True)
    if "fp32" not in paths:
      paths["fp32"] = os.path.join(tmp, "model_fp32.onnx")
      onnx_export.export_onnx(run, thr, paths["fp32"])
    base = run_onnx.score(run_onnx.load(paths["fp32"]), test["image"], 8)
    for p in precisions:
      for r in runtimes:
        model = _model(paths[p], r)
        if isinstance(model, str):
          rows.append({"precision": p, "runtime": r, "missing": model})
          continue
        out = run_onnx.score(model, test["image"], 8)
        res = dict(test, scores=out["scores"], maps=out["maps"], cls=out["cls"])
        m = tables.class_metrics(res, run.class_names)["mean"]
        flips = out["is_anomaly"] != base["is_anomaly"]
        dz = np.abs(out["normalised_scores"].astype(np.float64) - base["normalised_scores"])
        row = {
            "precision": p,
            "runtime": r,
            "images": len(flips),
            "i_auroc": m["i_auroc"],
            "p_auroc": m["p_auroc"],
            "aupro": m["aupro"],
            "flips": int(flips.sum()),
            "flip_rate": float(flips.mean()),
            "max_score_diff": float(dz.max()),
            "file_mib": os.path.getsize(paths[p]) / 2**20,
            "verified": model["verified"],
        }
        for bs in batch_sizes:
          x = np.ascontiguousarray(np.resize(test["image"], (bs, *test["image"].shape[1:])))
          t = np.float32(0.5)
          sec = _timed(lambda model=model, x=x: model["run"](x, t, t), min_seconds)
          row[f"images_per_s_b{bs}"] = bs / sec
          row[f"ms_b{bs}"] = 1000 * sec
        rows.append(row)
  return rows


def _mark(r: dict) -> str:
  return "" if r.get("verified", True) else " (wrong: refused)"


def markdown(rows: list[dict]) -> str:
  """`measure`'s rows as a table."""
  lines = [
      "| setup | precision | runtime | batch | images/s | ms/batch | vs JAX | MiB | "
      "GFLOP/image | share of peak |",
      "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    head = f"| {r['setup']} | {r.get('precision', 'fp32')} | {r['runtime']} | {r['batch']} |"
    if "missing" in r:
      lines.append(f"{head} not installed | | | | | |")
      continue
    vs = f"{r['vs_jax']:.2f}" if r.get("vs_jax") else ""
    mib = f"{r['file_mib']:.1f}" if r.get("file_mib") else ""
    lines.append(
        f"{head} {r['images_per_s']:.1f}{_mark(r)} | {r['ms_per_batch']:.1f} | {vs} | {mib} | "
        f"{r['gflop_per_image']:.2f} | {100 * r['peak_share']:.0f}% |"
    )
  return "\n".join(lines) + "\n"


def markdown_run(rows: list[dict], batch_sizes=(1, 8)) -> str:
  """`measure_run`'s rows as a table (metrics in percent)."""
  speed = " | ".join(f"images/s b{b} | ms b{b}" for b in batch_sizes)
  lines = [
      f"| precision | runtime | I-AUROC | P-AUROC | AUPRO | decisions flipped | max score diff "
      f"| MiB | {speed} |",
      "|---|---|---:|---:|---:|---:|---:|---:|" + "---:|" * (2 * len(batch_sizes)),
  ]
  for r in rows:
    if "missing" in r:
      lines.append(f"| {r['precision']} | {r['runtime']} | not installed |")
      continue
    speeds = " | ".join(f"{r[f'images_per_s_b{b}']:.1f} | {r[f'ms_b{b}']:.1f}" for b in batch_sizes)
    lines.append(
        f"| {r['precision']} | {r['runtime']}{_mark(r)} | {100 * r['i_auroc']:.2f} | "
        f"{100 * r['p_auroc']:.2f} | {100 * r['aupro']:.2f} | {r['flips']}/{r['images']} "
        f"({100 * r['flip_rate']:.1f}%) | {r['max_score_diff']:.3f} | {r['file_mib']:.2f} | "
        f"{speeds} |"
    )
  return "\n".join(lines) + "\n"
