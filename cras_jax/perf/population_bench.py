"""Throughput of populations of heads: images x models per second against the population size.

`measure` compiles and times one population train step (`engine.population`) of S members, in
either form ("vmap": one vmapped program; "map": the single run's compiled step once per
member), on stored features (the heads alone) or on images (the frozen backbone once per batch,
then the heads of every member), and the single-run step (`steps.make_train_step`) it replaces
S times.
Random weights, features and images: throughput does not depend on the values.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from cras_jax import backbones
from cras_jax.configs import demo, mvtec
from cras_jax.engine import population, steps

# name -> (config, crop): the demo's Lite0 at 160 px and the paper's WideResNet50 at 288 px.
SETUPS = {
    "lite0_160": (demo.get_config, "efficientnet_lite0", 160),
    "wrn50_288": (mvtec.get_config, "wide_resnet50_2", 288),
}
NUM_CLASSES = 4


def _config(setup: str, batch_size: int):
  get, backbone, crop = SETUPS[setup]
  cfg = get()
  cfg.model.backbone, cfg.data.crop, cfg.data.resize = backbone, crop, crop
  cfg.model.weights = "random"
  cfg.train.batch_size = batch_size
  return cfg


def _time(fn, args, n: int) -> tuple[float, float]:
  """(compile seconds, seconds per call over n calls after one warm call) of jitted fn; fn
  returns (state, metrics) and takes the state first (donated), so calls chain."""
  t0 = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  return compile_s, _time_calls(compiled, args, n)


def _time_calls(fn, args, n: int) -> float:
  """Seconds per call of fn over n chained calls, after one warm call."""
  state, rest = args[0], args[1:]
  state, m = fn(state, *rest)
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(n):
    state, m = fn(state, *rest)
  jax.block_until_ready((state, m))
  return (time.perf_counter() - t0) / n


def measure(
    setup: str,
    sizes,
    mode: str = "features",
    n: int = 3,
    batch_size: int = 16,
    batchings=("map", "vmap"),
):
  """-> rows {setup, mode, batching, size, compile_s, step_s, images_models_per_s,
  single_step_s, speedup (size x the single-run step time / the population step time)}.
  The "map" form compiles nothing more than the single-run step (its compile_s is that
  step's)."""
  cfg = _config(setup, batch_size)
  spec = steps.ModelSpec(cfg, NUM_CLASSES)
  backbone = jax.device_get(
      backbones.load_variables(cfg.model.backbone, "random", cfg.data.crop, 0)
  )
  rng = np.random.default_rng(0)
  d = cfg.model.embed_dim
  centres = rng.normal(size=(NUM_CLASSES, spec.num_patches, d)).astype(np.float32)
  labels = jnp.asarray(np.arange(batch_size) % NUM_CLASSES, jnp.int32)
  if mode == "features":
    batch = {
        "features": jnp.asarray(rng.normal(size=(batch_size, spec.num_patches, d)), jnp.float32)
    }
  else:
    crop = cfg.data.crop
    batch = {"image": jnp.asarray(rng.integers(0, 255, (batch_size, crop, crop, 3)), jnp.uint8)}
  batch["label"] = labels

  def state_of(seed):  # fresh device arrays: the steps donate their state
    state = steps.create_state(spec, jax.tree.map(jnp.array, backbone), seed)
    return state.replace(centres=jnp.array(centres))

  single = jax.jit(steps.make_train_step(spec), donate_argnums=0)
  single_compile, single_step = _time(single, (state_of(0), batch), n)
  rows = []
  vstep = jax.jit(population.make_population_step(spec), donate_argnums=0)
  embed = jax.jit(spec.features)
  for batching in batchings:
    for size in sizes:
      state = population.stack([state_of(s) for s in range(size)])
      if batching == "vmap":
        compile_s, step_s = _time(vstep, (state, batch), n)
      else:
        loop = population.make_member_loop(single, embed)
        compile_s, step_s = single_compile, _time_calls(loop, (state, batch), n)
      rows.append(
          {
              "setup": setup,
              "mode": mode,
              "batching": batching,
              "size": size,
              "compile_s": compile_s,
              "step_s": step_s,
              "images_models_per_s": size * batch_size / step_s,
              "single_compile_s": single_compile,
              "single_step_s": single_step,
              "speedup": size * single_step / step_s,
          }
      )
      print(markdown_row(rows[-1]), flush=True)
  return rows


HEADER = (
    "| setup | trains on | batching | S | compile s | step s | images·models/s | "
    "× vs S single runs (steps) |\n|---|---|---|---:|---:|---:|---:|---:|"
)


def markdown_row(r: dict) -> str:
  what = "stored features" if r["mode"] == "features" else "images (backbone)"
  return (
      f"| {r['setup']} | {what} | {r['batching']} | {r['size']} | {r['compile_s']:.1f} | "
      f"{r['step_s']:.3f} | "
      f"{r['images_models_per_s']:.3g} | {r['speedup']:.2f} |"
  )


def run_ratio(rows, steps_per_run: int, size: int = 8, batching: str = "vmap") -> dict | None:
  """Whole training of `size` seeds: one population against `size` separate runs (each
  compiling its step once and taking `steps_per_run` steps); process start-up, data and the
  feature pass, which a population also pays once, left out."""
  by = {r["size"]: r for r in rows if r["batching"] == batching}
  if size not in by:
    return None
  r = by[size]
  separate = size * (r["single_compile_s"] + steps_per_run * r["single_step_s"])
  together = r["compile_s"] + steps_per_run * r["step_s"]
  return {
      "batching": batching,
      "size": size,
      "steps": steps_per_run,
      "separate_s": separate,
      "population_s": together,
      "ratio": separate / together,
  }
