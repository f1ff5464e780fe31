#!/usr/bin/env python
"""Throughput benchmark of the CRAS steps: training and scoring, images/s.

Measures, for every combination of batch size, device count, precision and image size:
- `train`: `train.make_train_step`, the full training step on uint8 images (frozen backbone
  + adapter + synthesis + discriminator + backward + optimiser update; the uncached path,
  batch = {'image': uint8, 'label': int32}), jitted and sharded like `train.Devices.jit_train`
  (state replicated and donated, batch split on 'data');
- `score`: `train.make_predict_step` (backbone + adapter + matching + discriminator +
  anomaly map), jitted like `train.Devices.jit_predict`.

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

Examples:
  python tools/benchmark.py --config=configs/mvtec.py --batch_sizes=8 --image_size=288 \\
      --dtype=float32 --reps=5 --out=runs/bench
  python tools/benchmark.py --config=configs/demo.py --backbone=efficientnet_lite0 \\
      --image_size=64,160 --embed_dim=32 --batch_sizes=4,16 --dtype=float32,bfloat16 --out=runs/b
  # several devices on a CPU: simulate them
  XLA_FLAGS=--xla_force_host_platform_device_count=4 python tools/benchmark.py \\
      --config=configs/demo.py --devices=1,2,4 --batch_sizes=8 --out=runs/bench_dev

Compile times are those of this process: if a persistent compilation cache is configured
(`JAX_COMPILATION_CACHE_DIR`), a hit makes them small; each row records `compile_cache_hit`.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import inspect
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(_REPO_ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from cras_jax import backbones, train  # noqa: E402

# train_cached: the training step on stored backbone features (train.cache_features=True),
# which is how a run trains after its first feature pass: the backbone is frozen and training
# has no augmentation, so the step is the heads alone.
MODES = ("train", "train_cached", "score")


# ----------------------------------------------------------------------------- config

def load_config(path: str):
  """`get_config()` of a config file (configs/*.py), without absl flags; a relative path
  is looked up in the working directory, then in the repository."""
  if not os.path.exists(path) and not os.path.isabs(path):
    path = str(_REPO_ROOT / path)
  path = os.path.abspath(path)
  name = "_bench_config_" + Path(path).stem
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"--config={path}: not a Python file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _ints(s: str) -> list[int]:
  return [int(x) for x in str(s).split(",") if x.strip()]


def _strs(s: str) -> list[str]:
  return [x.strip() for x in str(s).split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/mvtec.py", help="config file with get_config()")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--batch_sizes", default="8", help="comma-separated global batch sizes")
  p.add_argument("--devices", default="1",
                 help="comma-separated device counts; N uses the first N of jax.devices()")
  p.add_argument("--dtype", default=None,
                 help="comma-separated config.model.dtype values (float32,bfloat16); "
                      "default: the config's")
  p.add_argument("--image_size", "--image_sizes", dest="image_size", default=None,
                 help="comma-separated input sizes (config.data.crop); default: the config's")
  p.add_argument("--backbone", default=None, help="override config.model.backbone")
  p.add_argument("--weights", default="random",
                 help="backbone weights (default 'random': timings do not depend on values)")
  p.add_argument("--embed_dim", type=int, default=None, help="override config.model.embed_dim")
  p.add_argument("--pre_embed_dim", type=int, default=None,
                 help="override config.model.pre_embed_dim (default: follows --embed_dim)")
  p.add_argument("--levels", default=None, help="override config.model.levels, e.g. 2,3")
  p.add_argument("--num_classes", type=int, default=0,
                 help="number of class centres K (default: the config's class count, or 4)")
  p.add_argument("--modes", default="train,score",
                 help="comma-separated: train, train_cached (heads on stored features), score")
  p.add_argument("--reps", type=int, default=5, help="timed repetitions")
  p.add_argument("--steps_per_rep", type=int, default=0,
                 help="steps per repetition (0: enough for --min_rep_seconds, at most 50)")
  p.add_argument("--min_rep_seconds", type=float, default=0.5)
  p.add_argument("--num_batches", type=int, default=2,
                 help="distinct input batches on the devices, cycled through")
  p.add_argument("--matmul_size", type=int, default=0,
                 help="n of the n x n float32 peak matmul (0: 4096 on accelerators, 2048 on CPU)")
  p.add_argument("--matmul_dtypes", default="float32",
                 help="dtypes of the peak matmul; the ratio column uses float32")
  p.add_argument("--profile", action="store_true",
                 help="write a jax.profiler trace of a few steady-state steps to OUT/trace/<row>")
  p.add_argument("--profile_steps", type=int, default=3)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  args.batch_sizes = _ints(args.batch_sizes)
  args.devices = _ints(args.devices)
  args.modes = _strs(args.modes)
  for m in args.modes:
    if m not in MODES:
      p.error(f"--modes: {m!r} is not one of {MODES}")
  if args.reps < 1:
    p.error("--reps must be >= 1")
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
    m.levels = tuple(_ints(args.levels))
  m.weights = args.weights
  m.dtype = dtype
  config.data.crop = image_size
  config.data.resize = max(int(config.data.resize), image_size)
  return config


# ----------------------------------------------------------------------------- devices

def make_devices(devs: Sequence[Any]) -> train.Devices:
  """`train.Devices` over the given devices (a 1-D mesh on 'data')."""
  devs = list(devs)
  if "devices" in inspect.signature(train.Devices.__init__).parameters:
    return train.Devices(devices=devs)
  d = train.Devices.__new__(train.Devices)  # same attributes as Devices.__init__
  d.mesh = Mesh(np.array(devs), ("data",))
  d.count = len(devs)
  d.replicated = NamedSharding(d.mesh, P())
  d.batch = NamedSharding(d.mesh, P("data"))
  return d


class CompileCounter:
  """Counts compile-pipeline activity (jax.monitoring events: tracing, lowering, XLA backend
  compiles, persistent-cache hits) and, apart, persistent-cache hits."""

  PREFIXES = ("/jax/core/compile/", "/jax/compilation_cache/cache_")
  CACHE_HIT = "/jax/compilation_cache/cache_hits"

  def __init__(self):
    self.compiles = 0
    self.cache_hits = 0
    jax.monitoring.register_event_duration_secs_listener(self._duration)
    jax.monitoring.register_event_listener(self._event)

  def _duration(self, name, _secs, **_):
    if name.startswith(self.PREFIXES):
      self.compiles += 1

  def _event(self, name, **_):
    if name.startswith(self.PREFIXES):
      self.compiles += 1
    if name == self.CACHE_HIT:
      self.cache_hits += 1

  def close(self):
    for unregister, fn in ((jax.monitoring.unregister_event_duration_listener, self._duration),
                           (jax.monitoring.unregister_event_listener, self._event)):
      with contextlib.suppress(Exception):
        unregister(fn)


# ----------------------------------------------------------------------------- XLA facts

def cost_flops(compiled) -> float | None:
  """XLA's FLOP count of a compiled step (per device), across cost_analysis() return types."""
  try:
    ca = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - not every backend implements it
    return None
  if isinstance(ca, (list, tuple)):  # older jax: one dict per module/device
    ca = ca[0] if ca else None
  if not ca:
    return None
  flops = ca.get("flops")
  return float(flops) if flops is not None and flops > 0 else None


def memory_bytes(compiled) -> int | None:
  """XLA's estimate of a step's device footprint (per device)."""
  try:
    ma = compiled.memory_analysis()
  except Exception:  # noqa: BLE001
    return None
  if ma is None:
    return None
  if isinstance(ma, (list, tuple)):
    ma = ma[0] if ma else None
    if ma is None:
      return None
  return int(ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
             - ma.alias_size_in_bytes)


def device_peak_bytes(devs) -> int | None:
  peaks = []
  for d in devs:
    try:
      stats = d.memory_stats()
    except Exception:  # noqa: BLE001
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


def stats(step_times: Sequence[float]) -> dict:
  t = np.asarray(step_times, np.float64)
  q1, med, q3 = np.percentile(t, [25, 50, 75])
  return {"median_s": float(med), "min_s": float(t.min()), "max_s": float(t.max()),
          "iqr_s": float(q3 - q1), "rep_step_times_s": [float(x) for x in t]}


def timed_reps(run_steps, reps: int, steps_per_rep: int) -> list[float]:
  """Time per step of each rep; `run_steps(k)` runs k steps and blocks on their outputs."""
  out = []
  for _ in range(reps):
    t0 = time.perf_counter()
    run_steps(steps_per_rep)
    out.append((time.perf_counter() - t0) / steps_per_rep)
  return out


def _cpu_seconds() -> float:
  return time.process_time()  # all threads of this process, ns resolution (os.times: 10 ms)


def _loadavg() -> float | None:
  try:
    return os.getloadavg()[0]
  except OSError:
    return None


def choose_steps(args, one_step_s: float) -> int:
  if args.steps_per_rep > 0:
    return args.steps_per_rep
  return int(min(50, max(1, math.ceil(args.min_rep_seconds / max(one_step_s, 1e-6)))))


# ----------------------------------------------------------------------------- matmul peak

def matmul_peak(devs, n: int, dtype: str, reps: int, min_rep_seconds: float) -> dict:
  """FLOP/s of an n x n @ n x n matmul, rows of A (and C) split over the devices."""
  devices = make_devices(devs)
  n = int(math.ceil(n / devices.count) * devices.count)
  dt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
  f = jax.jit(lambda a, b: a @ b, in_shardings=(devices.batch, devices.replicated),
              out_shardings=devices.batch)
  rng = np.random.default_rng(0)
  a = jax.device_put(jnp.asarray(rng.standard_normal((n, n), np.float32), dt), devices.batch)
  b = jax.device_put(jnp.asarray(rng.standard_normal((n, n), np.float32), dt), devices.replicated)
  f.lower(a, b).compile()
  t0 = time.perf_counter()
  jax.block_until_ready(f(a, b))
  k = int(min(50, max(2, math.ceil(min_rep_seconds / max(time.perf_counter() - t0, 1e-6)))))

  def run(k):
    jax.block_until_ready([f(a, b) for _ in range(k)])

  times = timed_reps(run, max(3, reps), k)
  flops = 2.0 * n ** 3
  return {"n": n, "dtype": dtype, "devices": devices.count, "steps_per_rep": k,
          "median_s": float(np.median(times)), "min_s": float(np.min(times)),
          "flops": flops, "flops_per_s": flops / float(np.min(times)),
          "flops_per_s_median": flops / float(np.median(times))}


# ----------------------------------------------------------------------------- one row

def bench_row(mode: str, config, args, devs, batch_size: int, num_classes: int, backbone_vars,
              counter: CompileCounter) -> dict:
  devices = make_devices(devs)
  pieces = train.Pieces(config, num_classes)
  size = pieces.image_size
  rng = np.random.default_rng(args.seed)
  state = train.create_state(pieces, backbone_vars, args.seed)
  state = state.replace(centres=jnp.asarray(
      rng.standard_normal(state.centres.shape, np.float32)))
  state = jax.device_put(state, devices.replicated)
  host_batches = [{"image": rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8),
                   "label": rng.integers(0, num_classes, (batch_size,), dtype=np.int32)}
                  for _ in range(max(1, args.num_batches))]
  if mode == "train":
    inputs = [devices.put_batch(b) for b in host_batches]
    jitted = devices.jit_train(train.make_train_step(pieces))
  elif mode == "train_cached":
    dtype = np.dtype(config.train.feature_cache_dtype)
    shape = (batch_size, pieces.num_patches, pieces.heads.embed_dim)
    inputs = [devices.put_batch({"features": rng.standard_normal(shape, np.float32).astype(dtype),
                                 "label": b["label"]}) for b in host_batches]
    jitted = devices.jit_train(train.make_train_step(pieces))
  else:
    inputs = [devices.put_batch({"image": b["image"]})["image"] for b in host_batches]
    jitted = devices.jit_predict(train.make_predict_step(pieces))
  jax.block_until_ready((state, inputs))

  hits0 = counter.cache_hits
  t0 = time.perf_counter()
  lowered = jitted.lower(state, inputs[0])
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  cache_hit = counter.cache_hits > hits0
  flops_per_device = cost_flops(compiled)
  xla_mem = memory_bytes(compiled)
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
      jax.block_until_ready([jitted(holder["state"], inputs[(start + i) % len(inputs)])
                             for i in range(k)])

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
  cpu0, wall0 = _cpu_seconds(), time.perf_counter()
  step_times = timed_reps(run, args.reps, k)
  cpu_util = (_cpu_seconds() - cpu0) / (time.perf_counter() - wall0)
  recompiles = counter.compiles - compiles0

  trace_dir = None
  if args.profile:
    trace_dir = os.path.join(args.out, "trace", row_label(mode, config, devices.count, batch_size))
    os.makedirs(trace_dir, exist_ok=True)
    with jax.profiler.trace(trace_dir):
      for i in range(args.profile_steps):
        with jax.profiler.StepTraceAnnotation(mode, step_num=i):
          run(1, i)

  s = stats(step_times)
  flops_total = flops_per_device * devices.count if flops_per_device else None
  row = {
      "mode": mode, "backbone": config.model.backbone, "image_size": size,
      "embed_dim": int(config.model.embed_dim), "num_classes": num_classes,
      "dtype": config.model.dtype, "devices": devices.count, "batch_size": batch_size,
      "platform": devs[0].platform, "device_kind": devs[0].device_kind,
      "lower_s": t1 - t0, "compile_s": t2 - t1, "lower_and_compile_s": t2 - t0,
      "compile_cache_hit": cache_hit, "first_call_s": first_call_s,
      "reps": args.reps, "steps_per_rep": k, **s,
      "images_per_s": batch_size / s["median_s"],
      "images_per_s_best": batch_size / s["min_s"],
      "flops_per_step": flops_total, "flops_per_step_per_device": flops_per_device,
      "achieved_flops_per_s": flops_total / s["median_s"] if flops_total else None,
      "xla_memory_bytes_per_device": xla_mem,
      "device_peak_bytes": device_peak_bytes(devs),
      "compiles_on_first_call": first_call_compiles,
      "recompiles_during_timing": recompiles,
      # CPU seconds of this process per wall second in the timed reps: on the CPU backend,
      # well under the core count means the host was shared (other load) or the step idles.
      "process_cpu_per_wall_s": cpu_util, "loadavg_1min": _loadavg(),
      "trace_dir": os.path.relpath(trace_dir, args.out) if trace_dir else None,
  }
  return row


def row_label(mode, config, n_devices, batch_size) -> str:
  return (f"{mode}_{config.model.backbone}_{config.data.crop}px_{config.model.dtype}"
          f"_{n_devices}dev_b{batch_size}")


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
      " | peak mem MiB | CPU s/s |",
      "|---|---|---:|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in result["rows"]:
    step = (f"{r['median_s'] * 1e3:.1f} [{r['min_s'] * 1e3:.1f}–{r['max_s'] * 1e3:.1f}]")
    compile_s = _fmt(r["lower_and_compile_s"], digits=2) + (" (cache)" if r["compile_cache_hit"]
                                                            else "")
    lines.append(
        f"| {r['mode']} | {r['backbone']} | {r['image_size']} | {r['embed_dim']} | {r['dtype']} | "
        f"{r['devices']} | {r['batch_size']} | {compile_s} | {step} | "
        f"{r['images_per_s']:.2f} | {_fmt(r['flops_per_step'], 1e9)} | "
        f"{_fmt(r['achieved_flops_per_s'], 1e9)} | {_fmt(r['peak_flops_per_s_f32'], 1e9)} | "
        f"{_fmt(r['ratio_to_peak_f32'], 0.01)} | {_fmt(r['xla_memory_bytes_per_device'], 2**20, 0)} | "
        f"{_fmt(r['device_peak_bytes'], 2**20, 0)} | {_fmt(r['process_cpu_per_wall_s'])} |")
  peaks = result["matmul_peaks"]
  if peaks:
    lines += ["", "Peak matmul (n x n @ n x n, rows split over the devices, best rep): " + "; ".join(
        f"{p['devices']} dev {p['dtype']} n={p['n']}: {p['flops_per_s'] / 1e9:.1f} GFLOP/s"
        for p in peaks)]
  for sk in result.get("skipped", []):
    lines += ["", f"skipped {sk['row']}: {sk['why']}"]
  bad = [r for r in result["rows"] if r["recompiles_during_timing"]]
  if bad:
    lines += ["", f"WARNING: {len(bad)} row(s) recompiled inside the timed loop."]
  return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
  import matplotlib
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
      ax.errorbar([r[xkey] for r in rs], [r["images_per_s"] for r in rs],
                  yerr=[[r["images_per_s"] - r["batch_size"] / r["max_s"] for r in rs],
                        [r["batch_size"] / r["min_s"] - r["images_per_s"] for r in rs]],
                  fmt="none", capsize=3, color=ax.lines[-1].get_color())
    ax.set_xscale("log", base=2)
    xs = sorted({r[xkey] for r in rows if r["mode"] == mode})
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("images/s (median, min–max)")
    ax.set_title({"train": "training step", "train_cached": "training step (stored features)",
                  "score": "scoring"}[mode])
    ax.grid(alpha=0.3)
    top = max(r["batch_size"] / r["min_s"] for r in rows if r["mode"] == mode)
    ax.set_ylim(0, 1.25 * top)
    ax.legend(fontsize=7)
  env = result["environment"]
  fig.suptitle(f"{result['config']} on {env['device_kind']} ({env['platform']})", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def environment() -> dict:
  d = jax.devices()
  import jaxlib
  return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "platform": d[0].platform,
          "device_kind": d[0].device_kind, "device_count": len(d), "python": platform.python_version(),
          "host": platform.machine(), "cpu_count": os.cpu_count(), "loadavg_1min": _loadavg(),
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


# ----------------------------------------------------------------------------- main

def main(argv: Sequence[str] | None = None) -> dict:
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  base = load_config(args.config)
  all_devices = jax.devices()
  for n in args.devices:
    if not 1 <= n <= len(all_devices):
      raise SystemExit(f"--devices: {n} requested, {len(all_devices)} available "
                       f"(on a CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N)")
  dtypes = _strs(args.dtype) if args.dtype else [base.model.dtype]
  sizes = _ints(args.image_size) if args.image_size else [int(base.data.crop)]
  num_classes = args.num_classes or len(base.data.classes) or 4
  env = environment()  # before any work: the load average is that of the rest of the host
  counter = CompileCounter()
  rows, skipped, peaks = [], [], []
  try:
    matmul_n = args.matmul_size or (2048 if all_devices[0].platform == "cpu" else 4096)
    matmul_dtypes = ["float32"] + [d for d in _strs(args.matmul_dtypes) if d != "float32"]
    peak_by = {}
    for n in args.devices:
      for dt in matmul_dtypes:
        pk = matmul_peak(all_devices[:n], matmul_n, dt, args.reps, args.min_rep_seconds)
        peaks.append(pk)
        peak_by[(n, dt)] = pk["flops_per_s"]
        print(f"peak matmul {n} dev {dt} n={pk['n']}: {pk['flops_per_s'] / 1e9:.1f} GFLOP/s",
              flush=True)
    vars_cache: dict = {}
    for size in sizes:
      for dtype in dtypes:
        config = configure(base, args, size, dtype)
        key = (config.model.backbone, args.weights, size)
        if key not in vars_cache:
          vars_cache.clear()
          # host copies: every row puts its own on the devices (the train step donates them)
          vars_cache[key] = jax.device_get(backbones.load_variables(
              config.model.backbone, args.weights, size, args.seed))
        for n in args.devices:
          for bs in args.batch_sizes:
            for mode in args.modes:
              label = row_label(mode, config, n, bs)
              if bs % n:
                skipped.append({"row": label, "why": f"batch {bs} not divisible by {n} devices"})
                print(f"skip {label}: batch not divisible by the device count", flush=True)
                continue
              row = bench_row(mode, config, args, all_devices[:n], bs, num_classes,
                              vars_cache[key], counter)
              row["peak_flops_per_s_f32"] = peak_by.get((n, "float32"))
              row["ratio_to_peak_f32"] = (row["achieved_flops_per_s"] / row["peak_flops_per_s_f32"]
                                          if row["achieved_flops_per_s"] and
                                          row["peak_flops_per_s_f32"] else None)
              same = peak_by.get((n, dtype))
              row["peak_flops_per_s_same_dtype"] = same
              row["ratio_to_peak_same_dtype"] = (row["achieved_flops_per_s"] / same
                                                 if row["achieved_flops_per_s"] and same else None)
              rows.append(row)
              print(f"{label}: compile {row['lower_and_compile_s']:.2f}s, step "
                    f"{row['median_s'] * 1e3:.1f} ms [{row['min_s'] * 1e3:.1f}–"
                    f"{row['max_s'] * 1e3:.1f}], {row['images_per_s']:.2f} images/s, "
                    f"{_fmt(row['achieved_flops_per_s'], 1e9)} GFLOP/s "
                    f"({_fmt(row['ratio_to_peak_f32'], 0.01)} % of f32 matmul peak)", flush=True)
  finally:
    counter.close()

  result = {"config": args.config,
            "args": {k: v for k, v in vars(args).items() if k != "out"},
            "environment": env, "matmul_peaks": peaks, "rows": rows,
            "skipped": skipped}
  with open(os.path.join(args.out, "benchmark.json"), "w") as f:
    json.dump(result, f, indent=2)
  md = markdown(result)
  with open(os.path.join(args.out, "benchmark.md"), "w") as f:
    f.write(md)
  if rows:
    plot(result, os.path.join(args.out, "benchmark.png"))
  print("\n" + md, flush=True)
  return result


if __name__ == "__main__":
  main()
