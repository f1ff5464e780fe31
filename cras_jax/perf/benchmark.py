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
  scores;
- beside each training row (unless `--noloop`), the training loop end to end as
  `python -m cras_jax.main` runs it (cras_jax/perf/loop_probe.py): `training.loop.run_steps`
  with batches read by `loader.BatchReader` from a prepared dataset of random images (`train`)
  or gathered from a memory-mapped feature cache (`train_cached`), through the loop's prefetch
  thread, the step as training compiles it, and a single run's NaN check and log every
  `train.log_every` steps: images/s, the share of each step the device waited for the host,
  the dispatch time, and the loader's rate alone.

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

import itertools
import json
import os
import tempfile
import types
from collections.abc import Sequence

import jax
from absl import app, flags
from ml_collections import config_flags

from cras_jax import backbones, configs
from cras_jax.base import errors, flag_checks
from cras_jax.engine import sharding
from cras_jax.perf import bench_report, loop_probe, probes
from cras_jax.perf import rows as row_lib
from cras_jax.perf.bench_report import fmt
from cras_jax.perf.rows import MODES

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
  flags.DEFINE_list(
      "parallelism",
      ["jit"],
      "Comma-separated forms of the steps (train.parallelism): jit, shard_map, pmap; each "
      "row is timed and read in each form (docs/training.md 'Parallelism').",
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
  flags.DEFINE_list(
      "loader_workers",
      [],
      "Also measure the loader (prepared dataset -> device batch, images/s) at each image "
      "size and the first batch size, with these worker-thread counts (0: the default, one "
      "per core up to 8), and the training loop's gather of stored features (one thread) "
      "from a feature cache of the config's model; empty: not measured.",
      flag_values=fv,
  )
  flags.DEFINE_bool(
      "loop",
      True,
      "Beside each training row (train, train_cached), the training loop end to end "
      "(cras_jax/perf/loop_probe.py): batches read (or gathered from a feature cache) through "
      "the loop's prefetch, the step, the NaN checks and logs every train.log_every steps; "
      "images/s and the host's share of each step. --noloop: the steps alone.",
      flag_values=fv,
  )
  flags.DEFINE_integer(
      "loop_steps",
      0,
      "Steps per timed rep of the loop (0: twice train.log_every); rounded up to a multiple "
      "of train.log_every.",
      flag_values=fv,
  )
  flags.DEFINE_integer(
      "loop_warm_steps", 2, "Loop steps before the timed reps (the first compiles).", flag_values=fv
  )
  flags.DEFINE_integer(
      "loop_images",
      64,
      "Images of the loop's synthetic training set (or feature cache), rounded up to whole "
      "batches.",
      flag_values=fv,
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
  flag_checks.bounded(fv, "loop_steps", 0, 10_000)
  flag_checks.bounded(fv, "loop_warm_steps", 1, 10_000)
  flag_checks.bounded(fv, "loop_images", 1, 100_000)
  flag_checks.subset(fv, "modes", ("train", "train_cached", "score"))
  flag_checks.subset(fv, "parallelism", sharding.FORMS)
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
    "parallelism",
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
    "loader_workers",
    "loop",
    "loop_steps",
    "loop_warm_steps",
    "loop_images",
)


def options(fv: flags.FlagValues) -> types.SimpleNamespace:
  """The parsed flags as the benchmark uses them (integer lists as integers)."""
  args = types.SimpleNamespace(**{k: fv[k].value for k in _OPTIONS})
  args.config = config_flags.get_config_filename(fv["config"])
  args.batch_sizes = [int(x) for x in args.batch_sizes]
  args.devices = [int(x) for x in args.devices]
  args.image_size = [int(x) for x in args.image_size] if args.image_size else None
  args.levels = tuple(int(x) for x in args.levels) if args.levels else None
  args.loader_workers = [int(x) for x in args.loader_workers]
  return args


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
  rows, skipped, peaks, loop_rows = [], [], [], []
  loop_root = tempfile.TemporaryDirectory()  # the loop rows' data and workdirs
  sources: dict = {}  # prepared datasets of the loop rows, by (image size, images)
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
        config = row_lib.configure(base, args, size, dtype)
        key = (config.model.backbone, args.weights, size)
        if key not in vars_cache and args.modes:
          vars_cache.clear()
          # host copies: every row puts its own on the devices (the train step donates them)
          vars_cache[key] = jax.device_get(
              backbones.load_variables(config.model.backbone, args.weights, size, args.seed)
          )
        for n, bs, form, mode in itertools.product(
            args.devices, args.batch_sizes, args.parallelism, args.modes
        ):
          config.train.parallelism = form
          label = row_lib.row_label(mode, config, n, bs)
          if bs % n:
            skipped.append({"row": label, "why": f"batch {bs} not divisible by {n} devices"})
            print(f"skip {label}: batch not divisible by the device count", flush=True)
            continue
          row = row_lib.bench_row(
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
              row["achieved_flops_per_s"] / same if row["achieved_flops_per_s"] and same else None
          )
          rows.append(row)
          print(
              f"{label}: compile {row['lower_and_compile_s']:.2f}s, step "
              f"{row['median_s'] * 1e3:.1f} ms [{row['min_s'] * 1e3:.1f}–"
              f"{row['max_s'] * 1e3:.1f}], {row['images_per_s']:.2f} images/s, "
              f"{fmt(row['achieved_flops_per_s'], 1e9)} GFLOP/s "
              f"({fmt(row['ratio_to_peak_f32'], 0.01)} % of f32 matmul peak)",
              flush=True,
          )
          if args.loop and mode in loop_probe.TRAIN_MODES:
            lr = loop_probe.loop_row(
                mode,
                config,
                args,
                all_devices[:n],
                bs,
                num_classes,
                vars_cache[key],
                loop_root.name,
                sources,
            )
            loop_probe.beside_step(lr, row)
            loop_rows.append(lr)
            print(
                f"loop {label}: {lr['median_s'] * 1e3:.1f} ms/step [{lr['min_s'] * 1e3:.1f}–"
                f"{lr['max_s'] * 1e3:.1f}], {lr['images_per_s']:.2f} images/s "
                f"({fmt(lr['loop_over_step'], digits=2)}× the step's time), device waited for "
                f"the host {lr['host_share'] * 100:.1f} % [{lr['host_share_min'] * 100:.1f}–"
                f"{lr['host_share_max'] * 100:.1f}], dispatch {lr['dispatch_s'] * 1e3:.2f} ms, "
                f"load {fmt(lr['loadavg_1min_start'])}–{fmt(lr['loadavg_1min_end'])}",
                flush=True,
            )
  finally:
    counter.close()
    loop_root.cleanup()

  loader_rows = (
      loop_probe.measure_loader(args, sizes, all_devices[:1], base, num_classes)
      if args.loader_workers
      else []
  )
  result = {
      "loop": loop_rows,
      "loader": loader_rows,
      "config": args.config,
      "args": {k: v for k, v in vars(args).items() if k != "out"},
      "environment": env,
      "matmul_peaks": peaks,
      "rows": rows,
      "skipped": skipped,
  }
  with open(os.path.join(args.out, "benchmark.json"), "w") as f:
    json.dump(result, f, indent=2)
  md = bench_report.markdown(result)
  with open(os.path.join(args.out, "benchmark.md"), "w") as f:
    f.write(md)
  if rows:
    bench_report.plot(result, os.path.join(args.out, "benchmark.png"))
  print("\n" + md, flush=True)
  return result


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  run(flag_values)
  return 0
