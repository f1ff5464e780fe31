#!/usr/bin/env python
"""Throughput benchmark of the CRAS steps: training and scoring, images/s.

Measures, for every combination of batch size, device count, precision and image size:
- `train`: `steps.make_train_step`, the full training step on uint8 images (frozen backbone
  + adapter + synthesis + discriminator + backward + optimiser update; the uncached path,
  batch = {'image': uint8, 'label': int32}), jitted and sharded by `Devices.jit_train`
  (state replicated and donated, batch split on 'data');
- `train_cached`: the same step on stored backbone features (`train.cache_features=True`);
- `score`: the predict step of a `scoring.Scorer` (backbone + adapter + matching +
  discriminator + anomaly map on the model's prepared scoring variables), as every command
  scores.

Per row: compile time (`jit(...).lower(...)` and `.compile()`, timed apart from steady
state), the first call, the steady state over `--reps` repetitions (each rep = several steps
ended by `block_until_ready`; inputs are put on the devices before the timed loop): median,
min/max and IQR of the time per step, images/s, XLA's FLOP count of the step
(`compiled.cost_analysis()`; XLA counts per device, the tool multiplies by the device count),
the achieved FLOP/s, and its ratio to the FLOP/s of a large float32 matmul measured in the same
run on the same devices (rows sharded on 'data', default precision, like the model's matmuls).
Device memory: the device's `memory_stats()` peak where it reports one (None on CPU; it is a
process-wide peak, so rows later in a run can only show the same or more) and XLA's own
estimate of the step's footprint (`compiled.memory_analysis()`: arguments + outputs + temporaries
- aliased donations, per device).

Backbone weights and class centres are random (no files needed): the timings do not depend on
the values. Results go to `--out`: `benchmark.json`, `benchmark.md` (also printed) and
`benchmark.png` (images/s against batch size, or against device count when only one batch
size is given). `--profile` also writes a `jax.profiler` trace of a few steady-state steps of
every row into `--out/trace/<row>/` (open with TensorBoard's profile plugin or Perfetto).

Examples (from the repository root):
  python -m cras_jax.benchmark --config=configs/mvtec.py --batch_sizes=8 --image_size=288 \\
      --dtype=float32 --reps=5 --out=runs/bench
  python -m cras_jax.benchmark --config=configs/demo.py --backbone=efficientnet_lite0 \\
      --image_size=64,160 --embed_dim=32 --batch_sizes=4,16 --dtype=float32,bfloat16 --out=runs/b
  # several devices on a CPU: simulate them
  XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m cras_jax.benchmark \\
      --config=configs/demo.py --devices=1,2,4 --batch_sizes=8 --out=runs/bench_dev

Compile times are those of this process: if a persistent compilation cache is configured
(`JAX_COMPILATION_CACHE_DIR`), a hit makes them small; each row records `compile_cache_hit`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import time
import types
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from cras_jax import backbones, configs
from cras_jax.base import errors, flag_checks
from cras_jax.engine import sharding, steps
from cras_jax.perf import probes
from cras_jax.runs import scoring

# train_cached: the training step on stored backbone features (train.cache_features=True),
# which is how a run trains after its first feature pass: the backbone is frozen and training
# has no augmentation, so the step is the heads alone.
MODES = ("train", "train_cached", "score")


# ----------------------------------------------------------------------------- flags


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The tool's flags (defined when it runs as a command)."""
  fv = flag_values
  configs.define_config_flag("config", "configs/mvtec.py", flag_values=fv)
  flags.DEFINE_string("out", None, "Output directory.", flag_values=fv)
  flags.DEFINE_list("batch_sizes", ["8"], "Comma-separated global batch sizes.", flag_values=fv)
  flags.DEFINE_list(
      "devices",
      ["1"],
      "Comma-separated device counts; N uses the first N of " "jax.devices().",
      flag_values=fv,
  )
  flags.DEFINE_list(
      "dtype",
      None,
      "Comma-separated config.model.dtype values (float32," "bfloat16); default: the config's.",
      flag_values=fv,
  )
  flags.DEFINE_list(
      "image_size",
      None,
      "Comma-separated input sizes (config.data.crop); " "default: the config's.",
      flag_values=fv,
  )
  flags.DEFINE_alias("image_sizes", "image_size", flag_values=fv)
  flags.DEFINE_string("backbone", None, "Override config.model.backbone.", flag_values=fv)
  flags.DEFINE_string(
      "weights",
      "random",
      "Backbone weights (default 'random': timings do not " "depend on values).",
      flag_values=fv,
  )
  flags.DEFINE_integer("embed_dim", None, "Override config.model.embed_dim.", flag_values=fv)
  flags.DEFINE_integer(
      "pre_embed_dim",
      None,
      "Override config.model.pre_embed_dim (default: " "follows --embed_dim).",
      flag_values=fv,
  )
  flags.DEFINE_list("levels", None, "Override config.model.levels, e.g. 2,3.", flag_values=fv)
  flags.DEFINE_integer(
      "num_classes",
      0,
      "Number of class centres K (default: the config's " "class count, or 4).",
      flag_values=fv,
  )
  flags.DEFINE_list(
      "modes",
      ["train", "score"],
      "Comma-separated: train, train_cached (heads " "on stored features), score.",
      flag_values=fv,
  )
  flags.DEFINE_integer("reps", 5, "Timed repetitions.", lower_bound=1, flag_values=fv)
  flags.DEFINE_integer(
      "steps_per_rep",
      0,
      "Steps per repetition (0: enough for " "--min_rep_seconds, at most 50).",
      flag_values=fv,
  )
  flags.DEFINE_float("min_rep_seconds", 0.5, "Shortest repetition, in seconds.", flag_values=fv)
  flags.DEFINE_integer(
      "num_batches", 2, "Distinct input batches on the devices, cycled " "through.", flag_values=fv
  )
  flags.DEFINE_integer(
      "matmul_size",
      0,
      "n of the n x n float32 peak matmul (0: 4096 on " "accelerators, 2048 on CPU).",
      flag_values=fv,
  )
  flags.DEFINE_list(
      "matmul_dtypes",
      ["float32"],
      "Dtypes of the peak matmul; the ratio column " "uses float32.",
      flag_values=fv,
  )
  flags.DEFINE_bool(
      "profile",
      False,
      "Write a jax.profiler trace of a few steady-state steps " "to OUT/trace/<row>.",
      flag_values=fv,
  )
  flags.DEFINE_integer("profile_steps", 3, "Steps of --profile.", flag_values=fv)
  flags.DEFINE_bool(
      "breakdown",
      True,
      "Per-stage shares (a profile of --breakdown_steps steps "
      "per row); --nobreakdown skips them.",
      flag_values=fv,
  )
  flags.DEFINE_integer("breakdown_steps", 2, "Steps of the per-stage profile.", flag_values=fv)
  flags.DEFINE_integer(
      "seed", 0, "Seed of the random weights, centres and batches.", flag_values=fv
  )
  flags.mark_flag_as_required("out", flag_values=fv)
  flag_checks.positive_ints(fv, "batch_sizes", 65536)
  flag_checks.positive_ints(fv, "devices", 4096)
  flag_checks.bounded(fv, "min_rep_seconds", 0.0, 3600.0)
  for name in ("num_batches", "profile_steps", "breakdown_steps"):
    flag_checks.bounded(fv, name, 1, 10_000)
  for name in ("embed_dim", "pre_embed_dim"):
    flag_checks.bounded(fv, name, 1, 16384)
  flag_checks.bounded(fv, "image_size", 32, 4096, item="entry")
  flag_checks.bounded(fv, "num_classes", 0, 10_000)
  flag_checks.bounded(fv, "steps_per_rep", 0, 10_000)
  flag_checks.bounded(fv, "matmul_size", 0, 65536)
  flag_checks.subset(fv, "modes", ("train", "train_cached", "score"))
  flags.register_validator(
      "modes", lambda ms: set(ms) <= set(MODES), f"--modes: each one of {MODES}", flag_values=fv
  )


_OPTIONS = (
    "out",
    "batch_sizes",
    "devices",
    "dtype",
    "image_size",
    "backbone",
    "weights",
    "embed_dim",
    "pre_embed_dim",
    "levels",
    "num_classes",
    "modes",
    "reps",
    "steps_per_rep",
    "min_rep_seconds",
    "num_batches",
    "matmul_size",
    "matmul_dtypes",
    "profile",
    "profile_steps",
    "breakdown",
    "breakdown_steps",
    "seed",
)


def options(fv: flags.FlagValues) -> types.SimpleNamespace:
  """The parsed flags as the benchmark uses them (integer lists as integers)."""
  args = types.SimpleNamespace(**{k: fv[k].value for k in _OPTIONS})
  args.config = config_flags.get_config_filename(fv["config"])
  args.batch_sizes = [int(x) for x in args.batch_sizes]
  args.devices = [int(x) for x in args.devices]
  args.image_size = [int(x) for x in args.image_size] if args.image_size else None
  args.levels = tuple(int(x) for x in args.levels) if args.levels else None
  return args


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


def choose_steps(args, one_step_s: float) -> int:
  if args.steps_per_rep > 0:
    return args.steps_per_rep
  return int(min(50, max(1, math.ceil(args.min_rep_seconds / max(one_step_s, 1e-6)))))


# ----------------------------------------------------------------------------- one row


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
  devices = sharding.Devices(devices=list(devs))
  spec = steps.ModelSpec(config, num_classes)
  size = spec.image_size
  rng = np.random.default_rng(args.seed)
  state = steps.create_state(spec, backbone_vars, args.seed)
  state = state.replace(centres=jnp.asarray(rng.standard_normal(state.centres.shape, np.float32)))
  state = jax.device_put(state, devices.replicated)
  host_batches = [
      {
          "image": rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8),
          "label": rng.integers(0, num_classes, (batch_size,), dtype=np.int32),
      }
      for _ in range(max(1, args.num_batches))
  ]
  if mode == "train":
    inputs = [devices.put_batch(b) for b in host_batches]
    jitted = devices.jit_train(steps.make_train_step(spec))
  elif mode == "train_cached":
    dtype = np.dtype(config.train.feature_cache_dtype)
    shape = (batch_size, spec.num_patches, spec.heads.embed_dim)
    inputs = [
        devices.put_batch(
            {"features": rng.standard_normal(shape, np.float32).astype(dtype), "label": b["label"]}
        )
        for b in host_batches
    ]
    jitted = devices.jit_train(steps.make_train_step(spec))
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
  xla_mem = probes.memory_bytes(compiled)
  hlo = compiled.as_text() if args.breakdown else ""
  stages = probes.op_stages(hlo) if args.breakdown else {}
  matmuls = probes.matmul_ops(hlo) if args.breakdown else set()
  del lowered, compiled

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
      "device_peak_bytes": probes.device_peak_bytes(devs),
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
  return (
      f"{mode}_{config.model.backbone}_{config.data.crop}px_{config.model.dtype}"
      f"_{n_devices}dev_b{batch_size}"
  )


# ----------------------------------------------------------------------------- output


def _fmt(x, scale=1.0, digits=1):
  if x is None:
    return "–"
  v = x / scale
  if digits == 1 and abs(v) < 10:
    digits = 2  # small values: keep two significant figures or so
  return f"{v:.{digits}f}"


def markdown(result: dict) -> str:
  lines = [
      f"Benchmark: {result['config']} on {result['environment']['device_count']} x "
      f"{result['environment']['device_kind']} ({result['environment']['platform']}), "
      f"jax {result['environment']['jax']}; {result['rows'][0]['reps'] if result['rows'] else 0}"
      f" reps; step time median [min–max]; FLOPs from XLA's cost analysis; CPU s/s: this "
      f"process's CPU seconds per wall second while timed ({result['environment']['cpu_count']}"
      f" host CPUs, 1-min load average {_fmt(result['environment']['loadavg_1min'])} at the start).",
      "",
      "| mode | backbone | image | D | dtype | dev | batch | compile s | step ms median [min–max]"
      " | images/s | GFLOP/step | achieved GFLOP/s | f32 matmul GFLOP/s | % of peak | XLA mem MiB"
      " | peak mem MiB | CPU s/s | backbone % | adapter+matching % | discriminator % | other %"
      " | matmul ops % |",
      "|---|---|---:|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"
      "---:|---:|---:|---:|---:|",
  ]
  for r in result["rows"]:
    step = f"{r['median_s'] * 1e3:.1f} [{r['min_s'] * 1e3:.1f}–{r['max_s'] * 1e3:.1f}]"
    compile_s = _fmt(r["lower_and_compile_s"], digits=2) + (
        " (cache)" if r["compile_cache_hit"] else ""
    )
    lines.append(
        f"| {r['mode']} | {r['backbone']} | {r['image_size']} | {r['embed_dim']} | {r['dtype']} | "
        f"{r['devices']} | {r['batch_size']} | {compile_s} | {step} | "
        f"{r['images_per_s']:.2f} | {_fmt(r['flops_per_step'], 1e9)} | "
        f"{_fmt(r['achieved_flops_per_s'], 1e9)} | {_fmt(r['peak_flops_per_s_f32'], 1e9)} | "
        f"{_fmt(r['ratio_to_peak_f32'], 0.01)} | {_fmt(r['xla_memory_bytes_per_device'], 2**20, 0)} | "
        f"{_fmt(r['device_peak_bytes'], 2**20, 0)} | {_fmt(r['process_cpu_per_wall_s'])} | "
        + " | ".join(
            _fmt(sh.get(k) if (sh := r.get("stage_shares")) else None, 0.01, 0)
            for k in probes.STAGE_NAMES
        )
        + f" | {_fmt(r.get('matmul_time_share'), 0.01, 0)} |"
    )
  peaks = result["matmul_peaks"]
  if peaks:
    lines += [
        "",
        "Peak matmul (n x n @ n x n, rows split over the devices, best rep): "
        + "; ".join(
            f"{p['devices']} dev {p['dtype']} n={p['n']}: {p['flops_per_s'] / 1e9:.1f} GFLOP/s"
            for p in peaks
        ),
    ]
  if any(r.get("stage_shares") for r in result["rows"]):
    lines += [
        "",
        "Stage shares: of the summed time of the step's ops in a profile (ops running "
        "at once on several threads all count): backbone = frozen backbone and patch "
        "aggregation; adapter+matching = adapter, global and local matching; "
        "discriminator = discriminator and loss; other = noise, DAFS, optimiser, "
        "anomaly map. matmul ops: the share of that time in matrix products and "
        "convolutions, where nearly all of XLA's FLOPs are; the rest is elementwise and "
        "data-movement work (BatchNorm, activations, unfolding, pooling, argmax, noise).",
    ]
  for sk in result.get("skipped", []):
    lines += ["", f"skipped {sk['row']}: {sk['why']}"]
  bad = [r for r in result["rows"] if r["recompiles_during_timing"]]
  if bad:
    lines += ["", f"WARNING: {len(bad)} row(s) recompiled inside the timed loop."]
  return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
  import matplotlib  # here only: plotting, for the figure alone

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = result["rows"]
  modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
  by_batch = len({r["batch_size"] for r in rows}) > 1 or len({r["devices"] for r in rows}) == 1
  xkey, xlabel = ("batch_size", "batch size") if by_batch else ("devices", "device count")
  fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4), squeeze=False)
  for ax, mode in zip(axes[0], modes):
    groups: dict[tuple, list] = {}
    other = "devices" if by_batch else "batch_size"
    for r in rows:
      if r["mode"] != mode:
        continue
      key = (r["backbone"], r["image_size"], r["dtype"], other, r[other])
      groups.setdefault(key, []).append(r)
    for (bb, size, dtype, other, val), rs in sorted(groups.items(), key=str):
      rs = sorted(rs, key=lambda r: r[xkey])
      label = f"{bb} {size}px {dtype}, {'dev' if other == 'devices' else 'batch'} {val}"
      ax.plot([r[xkey] for r in rs], [r["images_per_s"] for r in rs], "o-", label=label)
      ax.errorbar(
          [r[xkey] for r in rs],
          [r["images_per_s"] for r in rs],
          yerr=[
              [r["images_per_s"] - r["batch_size"] / r["max_s"] for r in rs],
              [r["batch_size"] / r["min_s"] - r["images_per_s"] for r in rs],
          ],
          fmt="none",
          capsize=3,
          color=ax.lines[-1].get_color(),
      )
    ax.set_xscale("log", base=2)
    xs = sorted({r[xkey] for r in rows if r["mode"] == mode})
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("images/s (median, min–max)")
    ax.set_title(
        {
            "train": "training step",
            "train_cached": "training step (stored features)",
            "score": "scoring",
        }[mode]
    )
    ax.grid(alpha=0.3)
    top = max(r["batch_size"] / r["min_s"] for r in rows if r["mode"] == mode)
    ax.set_ylim(0, 1.25 * top)
    ax.legend(fontsize=7)
  env = result["environment"]
  fig.suptitle(f"{result['config']} on {env['device_kind']} ({env['platform']})", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ----------------------------------------------------------------------------- main


def run(fv: flags.FlagValues) -> dict:
  """Runs every row the flags ask for; writes and returns the result (module doc)."""
  args = options(fv)
  os.makedirs(args.out, exist_ok=True)
  base = fv.config
  all_devices = jax.devices()
  for n in args.devices:
    if not 1 <= n <= len(all_devices):
      raise errors.UserValueError(
          f"--devices: {n} requested, {len(all_devices)} available "
          f"(on a CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N)"
      )
  dtypes = list(args.dtype) if args.dtype else [base.model.dtype]
  sizes = args.image_size or [int(base.data.crop)]
  num_classes = args.num_classes or len(base.data.classes) or 4
  env = probes.environment()  # before any work: the load average is that of the rest of the host
  counter = probes.CompileCounter()
  rows, skipped, peaks = [], [], []
  try:
    matmul_n = args.matmul_size or (2048 if all_devices[0].platform == "cpu" else 4096)
    matmul_dtypes = ["float32"] + [d for d in args.matmul_dtypes if d != "float32"]
    peak_by = {}
    for n in args.devices:
      for dt in matmul_dtypes:
        pk = probes.matmul_peak(all_devices[:n], matmul_n, dt, args.reps, args.min_rep_seconds)
        peaks.append(pk)
        peak_by[(n, dt)] = pk["flops_per_s"]
        print(
            f"peak matmul {n} dev {dt} n={pk['n']}: {pk['flops_per_s'] / 1e9:.1f} GFLOP/s",
            flush=True,
        )
    vars_cache: dict = {}
    for size in sizes:
      for dtype in dtypes:
        config = configure(base, args, size, dtype)
        key = (config.model.backbone, args.weights, size)
        if key not in vars_cache:
          vars_cache.clear()
          # host copies: every row puts its own on the devices (the train step donates them)
          vars_cache[key] = jax.device_get(
              backbones.load_variables(config.model.backbone, args.weights, size, args.seed)
          )
        for n in args.devices:
          for bs in args.batch_sizes:
            for mode in args.modes:
              label = row_label(mode, config, n, bs)
              if bs % n:
                skipped.append({"row": label, "why": f"batch {bs} not divisible by {n} devices"})
                print(f"skip {label}: batch not divisible by the device count", flush=True)
                continue
              row = bench_row(
                  mode, config, args, all_devices[:n], bs, num_classes, vars_cache[key], counter
              )
              row["peak_flops_per_s_f32"] = peak_by.get((n, "float32"))
              row["ratio_to_peak_f32"] = (
                  row["achieved_flops_per_s"] / row["peak_flops_per_s_f32"]
                  if row["achieved_flops_per_s"] and row["peak_flops_per_s_f32"]
                  else None
              )
              same = peak_by.get((n, dtype))
              row["peak_flops_per_s_same_dtype"] = same
              row["ratio_to_peak_same_dtype"] = (
                  row["achieved_flops_per_s"] / same
                  if row["achieved_flops_per_s"] and same
                  else None
              )
              rows.append(row)
              print(
                  f"{label}: compile {row['lower_and_compile_s']:.2f}s, step "
                  f"{row['median_s'] * 1e3:.1f} ms [{row['min_s'] * 1e3:.1f}–"
                  f"{row['max_s'] * 1e3:.1f}], {row['images_per_s']:.2f} images/s, "
                  f"{_fmt(row['achieved_flops_per_s'], 1e9)} GFLOP/s "
                  f"({_fmt(row['ratio_to_peak_f32'], 0.01)} % of f32 matmul peak)",
                  flush=True,
              )
  finally:
    counter.close()

  result = {
      "config": args.config,
      "args": {k: v for k, v in vars(args).items() if k != "out"},
      "environment": env,
      "matmul_peaks": peaks,
      "rows": rows,
      "skipped": skipped,
  }
  with open(os.path.join(args.out, "benchmark.json"), "w") as f:
    json.dump(result, f, indent=2)
  md = markdown(result)
  with open(os.path.join(args.out, "benchmark.md"), "w") as f:
    f.write(md)
  if rows:
    plot(result, os.path.join(args.out, "benchmark.png"))
  print("\n" + md, flush=True)
  return result


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  run(flag_values)
  return 0


if __name__ == "__main__":
  define_flags()
  errors.define_verbose_flag()
  errors.run(main)
