"""One row of the benchmark (cras_jax/benchmark.py): a step of one mode at one batch size,
device count, dtype and image size, compiled, timed and read (XLA's FLOPs, bytes and memory,
collectives); and the compile-only facts of the same steps on abstract inputs, which the
scaling model (cras_jax/scaling.py) reads for device counts it does not run."""

from __future__ import annotations

import copy
import math
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from cras_jax.engine import resident, sharding, steps
from cras_jax.perf import hlo, probes
from cras_jax.scoring import scoring

# train_cached: the training step on stored backbone features (train.cache_features=True),
# which is how a run trains after its first feature pass: the backbone is frozen and training
# has no augmentation, so the step is the heads alone.
MODES = ("train", "train_cached", "score")


def configure(base, args, image_size: int, dtype: str):
  config = copy.deepcopy(base)
  m = config.model
  if args.backbone:
    m.backbone = args.backbone
  if args.embed_dim:
    m.embed_dim = args.embed_dim
    if not args.pre_embed_dim:
      m.pre_embed_dim = args.embed_dim
  if args.pre_embed_dim:
    m.pre_embed_dim = args.pre_embed_dim
  if args.levels:
    m.levels = args.levels
  m.weights = args.weights
  m.dtype = dtype
  config.data.crop = image_size
  config.data.resize = max(int(config.data.resize), image_size)
  return config


def initial_state(spec, backbone_vars, seed: int, devices, rng: np.random.Generator):
  """A training state of `spec` on `devices` (replicated): the backbone's variables
  `backbone_vars`, random class centres drawn from `rng` (the timings do not depend on them)."""
  state = steps.create_state(spec, backbone_vars, seed)
  state = state.replace(centres=jnp.asarray(rng.standard_normal(state.centres.shape, np.float32)))
  return jax.device_put(state, devices.replicated)


def input_bytes_per_image(mode: str, config, spec) -> int:
  """What the host sends a device per training image: the uint8 image at the crop size
  (`train`), or its stored features, patches x feature dim in the feature cache's dtype
  (`train_cached`); and its int32 label."""
  if mode == "train_cached":
    item = np.dtype(config.train.feature_cache_dtype).itemsize
    return int(spec.num_patches * spec.heads.embed_dim * item) + 4
  return int(spec.image_size) ** 2 * 3 + 4


def choose_steps(args, one_step_s: float) -> int:
  if args.steps_per_rep > 0:
    return args.steps_per_rep
  return int(min(50, max(1, math.ceil(args.min_rep_seconds / max(one_step_s, 1e-6)))))


def bench_row(
    mode: str,
    config,
    args,
    devs,
    batch_size: int,
    num_classes: int,
    backbone_vars,
    counter: probes.CompileCounter,
) -> dict:
  devices = sharding.Devices(list(devs), config.train.parallelism)
  spec = steps.ModelSpec(config, num_classes)
  size = spec.image_size
  rng = np.random.default_rng(args.seed)
  state = initial_state(spec, backbone_vars, args.seed, devices, rng)
  host_batches = [
      {
          "image": rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8),
          "label": rng.integers(0, num_classes, (batch_size,), dtype=np.int32),
      }
      for _ in range(max(1, args.num_batches))
  ]
  if mode == "train":
    inputs = [devices.put_batch(b) for b in host_batches]
    jitted = devices.compile_train(spec)
  elif mode == "train_cached":
    dtype = np.dtype(config.train.feature_cache_dtype)
    shape = (batch_size, spec.num_patches, spec.heads.embed_dim)
    inputs = [
        devices.put_batch(
            {"features": rng.standard_normal(shape, np.float32).astype(dtype), "label": b["label"]}
        )
        for b in host_batches
    ]
    jitted = devices.compile_train(spec)
  else:  # how every command scores: the Scorer's jitted predict step on its prepared variables
    scorer = scoring.Scorer(spec, devices, batch_size, state=state)  # prepared once, not timed
    inputs = [devices.put_batch({"image": b["image"]})["image"] for b in host_batches]
    jitted, state = scorer.predict_step, scorer.svars
  jax.block_until_ready((state, inputs))

  hits0 = counter.cache_hits
  t0 = time.perf_counter()
  lowered = jitted.lower(state, inputs[0])
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  cache_hit = counter.cache_hits > hits0
  flops_per_device = probes.cost_flops(compiled)
  xla_mem = resident.step_footprint(compiled)
  text = compiled.as_text()  # read once: the facts and the breakdown's op maps
  facts = compiled_facts(compiled, devices.count, text)
  stages = probes.op_stages(text) if args.breakdown else {}
  matmuls = probes.matmul_ops(text) if args.breakdown else set()
  del lowered, compiled, text

  # The state is donated in training: thread it through every call.
  holder = {"state": state}

  if mode in ("train", "train_cached"):

    def run(k, start=0):
      s = holder["state"]
      metrics = []
      for i in range(k):
        s, m = jitted(s, inputs[(start + i) % len(inputs)])
        metrics.append(m)
      holder["state"] = s
      jax.block_until_ready((s, metrics))

  else:

    def run(k, start=0):
      jax.block_until_ready(
          [jitted(holder["state"], inputs[(start + i) % len(inputs)]) for i in range(k)]
      )

  compiles0 = counter.compiles
  t3 = time.perf_counter()
  run(1)  # first call: runtime set-up, still outside the steady state
  first_call_s = time.perf_counter() - t3
  first_call_compiles = counter.compiles - compiles0
  compiles0 = counter.compiles
  t4 = time.perf_counter()
  run(1, 1)  # warm
  warm_s = time.perf_counter() - t4
  k = choose_steps(args, warm_s)
  cpu0, wall0 = probes.cpu_seconds(), time.perf_counter()
  step_times = probes.timed_reps(run, args.reps, k)
  cpu_util = (probes.cpu_seconds() - cpu0) / (time.perf_counter() - wall0)
  recompiles = counter.compiles - compiles0

  trace_dir = None
  if args.profile:
    trace_dir = os.path.join(args.out, "trace", row_label(mode, config, devices.count, batch_size))
    os.makedirs(trace_dir, exist_ok=True)
    with jax.profiler.trace(trace_dir):
      for i in range(args.profile_steps):
        with jax.profiler.StepTraceAnnotation(mode, step_num=i):
          run(1, i)

  shares = matmul_share = None
  if args.breakdown:
    with tempfile.TemporaryDirectory() as tmp:
      with jax.profiler.trace(tmp, create_perfetto_trace=True):
        run(args.breakdown_steps)
      shares, matmul_share = probes.stage_shares(
          tmp, stages, "train_step" if mode != "score" else "predict_step", matmuls
      )

  s = probes.stats(step_times)
  flops_total = flops_per_device * devices.count if flops_per_device else None
  row = {
      "mode": mode,
      "parallelism": devices.parallelism,
      "backbone": config.model.backbone,
      "image_size": size,
      "embed_dim": int(config.model.embed_dim),
      "num_classes": num_classes,
      "dtype": config.model.dtype,
      "devices": devices.count,
      "batch_size": batch_size,
      "platform": devs[0].platform,
      "device_kind": devs[0].device_kind,
      "lower_s": t1 - t0,
      "compile_s": t2 - t1,
      "lower_and_compile_s": t2 - t0,
      "compile_cache_hit": cache_hit,
      "first_call_s": first_call_s,
      "reps": args.reps,
      "steps_per_rep": k,
      **s,
      "images_per_s": batch_size / s["median_s"],
      "images_per_s_best": batch_size / s["min_s"],
      "flops_per_step": flops_total,
      "flops_per_step_per_device": flops_per_device,
      "achieved_flops_per_s": flops_total / s["median_s"] if flops_total else None,
      "xla_memory_bytes_per_device": xla_mem,
      "bytes_accessed_per_device": facts["bytes_accessed"],
      "collectives": facts["collectives"],
      "largest_writes": facts["largest_writes"],
      "device_peak_bytes": probes.device_peak_bytes(devs),
      "process_peak_rss_bytes": probes.process_peak_rss_bytes(),  # so far, in this process
      "ms_per_image": s["median_s"] * 1e3 / batch_size,  # at batch 1: the latency
      "compiles_on_first_call": first_call_compiles,
      "recompiles_during_timing": recompiles,
      # CPU seconds of this process per wall second in the timed reps: on the CPU backend,
      # well under the core count means the host was shared (other load) or the step idles.
      "process_cpu_per_wall_s": cpu_util,
      "loadavg_1min": probes.loadavg(),
      "trace_dir": os.path.relpath(trace_dir, args.out) if trace_dir else None,
      "stage_shares": shares,
      # Share of the op time in matrix products and convolutions (where XLA's FLOPs are);
      # the rest is elementwise and data-movement work.
      "matmul_time_share": matmul_share,
  }
  return row


def row_label(mode, config, n_devices, batch_size) -> str:
  form = config.train.parallelism
  return (
      f"{mode}_{config.model.backbone}_{config.data.crop}px_{config.model.dtype}"
      f"_{n_devices}dev_b{batch_size}" + ("" if form == "jit" else f"_{form}")
  )


# ----------------------------------------------------------------------------- compile only


def compiled_facts(compiled, n_devices: int, text: str | None = None) -> dict:
  """What the scaling model reads from a compiled step, per device: FLOPs and bytes accessed
  (cost analysis), memory (memory analysis), the collectives of the optimised HLO and its
  largest top-level writes (`hlo.largest_writes`: where the bytes go)."""
  text = compiled.as_text() if text is None else text
  items = hlo.collectives(text, n_devices)
  return {
      **hlo.cost(compiled),
      "memory": hlo.memory(compiled),
      "collectives": hlo.summarise_collectives(items),
      "collective_list": items,
      "largest_writes": hlo.largest_writes(text),
  }


def _abstract(tree, sharding_):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_), tree)


def compile_step(mode: str, config, devs, batch_size: int, num_classes: int) -> dict:
  """Compiles one mode's step on abstract inputs (shapes only: no weights, no data) for the
  devices `devs`, as the benchmark and training shard it; returns `compiled_facts` and the
  lower and compile seconds."""
  devices = sharding.Devices(list(devs), config.train.parallelism)
  spec = steps.ModelSpec(config, num_classes)
  size = spec.image_size
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  backbone_vars = jax.eval_shape(spec.backbone.init, jax.random.PRNGKey(0), x)
  state = jax.eval_shape(lambda b: steps.create_state(spec, b, 0), backbone_vars)
  state = _abstract(state, devices.replicated)
  labels = jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=devices.batch)
  images = jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.uint8, sharding=devices.batch)
  if mode == "train":
    fn, args = devices.compile_train(spec), (
        state,
        {"image": images, "label": labels},
    )
  elif mode == "train_cached":
    shape = (batch_size, spec.num_patches, spec.heads.embed_dim)
    feats = jax.ShapeDtypeStruct(
        shape, jnp.dtype(config.train.feature_cache_dtype), sharding=devices.batch
    )
    fn, args = devices.compile_train(spec), (
        state,
        {"features": feats, "label": labels},
    )
  else:
    svars = _abstract(jax.eval_shape(steps.make_prepare_step(spec), state), devices.replicated)
    predict = steps.make_predict_step(spec, axis_name=devices.axis_name)
    fn, args = devices.jit_predict(predict), (svars, images)
  t0 = time.perf_counter()
  lowered = fn.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  return {**compiled_facts(compiled, devices.count), "lower_s": t1 - t0, "compile_s": t2 - t1}
