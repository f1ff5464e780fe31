"""What the benchmark measures with: compile counting, XLA's cost and memory analyses, device
memory, timed repetitions, the peak of a large matmul, per-stage shares of a profiled step, and
the machine's description."""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import os
import platform
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from cras_jax.engine import sharding


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
    for unregister, fn in (
        (jax.monitoring.unregister_event_duration_listener, self._duration),
        (jax.monitoring.unregister_event_listener, self._event),
    ):
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


def process_peak_rss_bytes() -> int | None:
  """This process's peak resident memory so far (getrusage; None where unavailable): on the
  CPU backend the devices' memory is the process's."""
  try:
    import resource  # POSIX only
  except ImportError:
    return None
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # Linux: KiB


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
  return {
      "median_s": float(med),
      "min_s": float(t.min()),
      "max_s": float(t.max()),
      "iqr_s": float(q3 - q1),
      "rep_step_times_s": [float(x) for x in t],
  }


def timed_reps(run_steps, reps: int, steps_per_rep: int) -> list[float]:
  """Time per step of each rep; `run_steps(k)` runs k steps and blocks on their outputs."""
  out = []
  for _ in range(reps):
    t0 = time.perf_counter()
    run_steps(steps_per_rep)
    out.append((time.perf_counter() - t0) / steps_per_rep)
  return out


def cpu_seconds() -> float:
  return time.process_time()  # all threads of this process, ns resolution (os.times: 10 ms)


def loadavg() -> float | None:
  try:
    return os.getloadavg()[0]
  except OSError:
    return None


# ----------------------------------------------------------------------------- matmul peak


def matmul_peak(devs, n: int, dtype: str, reps: int, min_rep_seconds: float) -> dict:
  """FLOP/s of an n x n @ n x n matmul, rows of A (and C) split over the devices."""
  devices = sharding.Devices(devices=list(devs))
  n = int(math.ceil(n / devices.count) * devices.count)
  dt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
  f = jax.jit(
      lambda a, b: a @ b,
      in_shardings=(devices.batch, devices.replicated),
      out_shardings=devices.batch,
  )
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
  flops = 2.0 * n**3
  return {
      "n": n,
      "dtype": dtype,
      "devices": devices.count,
      "steps_per_rep": k,
      "median_s": float(np.median(times)),
      "min_s": float(np.min(times)),
      "flops": flops,
      "flops_per_s": flops / float(np.min(times)),
      "flops_per_s_median": flops / float(np.median(times)),
  }


# ----------------------------------------------------------------------------- stage shares

# Stages of a step, by the named scopes the model code puts on its ops (cras_jax/engine/model.py):
# an op belongs to the first stage one of whose scopes appears in its HLO op_name.
STAGES = (
    ("backbone", ("backbone", "aggregate")),
    ("adapter_matching", ("adapter", "matching")),
    ("discriminator", ("discriminator", "loss")),
)
STAGE_NAMES = tuple(s for s, _ in STAGES) + ("other",)


def op_stages(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> stage, from the op_name metadata of a compiled module."""
  out = {}
  pattern = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{[^}]*op_name="([^"]*)"')
  for line in hlo_text.splitlines():
    m = pattern.match(line)
    if not m:
      continue
    name, op_name = m.groups()
    words = set(re.findall(r"[A-Za-z_]+", op_name))
    out[name] = next((stage for stage, scopes in STAGES if words & set(scopes)), "other")
  return out


def matmul_ops(hlo_text: str) -> set[str]:
  """Names of the instructions of a compiled module that are matrix products or
  convolutions: a dot / convolution itself, or a fusion whose computation holds one."""
  computations: dict[str, bool] = {}
  current = None
  for line in hlo_text.splitlines():
    head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) \(", line)
    if head and line.rstrip().endswith("{"):
      current = head.group(1)
      computations[current] = False
    elif current and re.search(r"= \S+ (dot|convolution)\(", line):
      computations[current] = True
  out = set()
  for line in hlo_text.splitlines():
    m = re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) = \S+ (\w+)\(", line)
    if not m:
      continue
    name, op = m.groups()
    called = re.search(r"calls=%?([\w.\-]+)", line)
    if op in ("dot", "convolution") or (called and computations.get(called.group(1))):
      out.add(name)
  return out


def stage_shares(
    trace_dir: str, stages: dict[str, str], module_hint: str, matmuls: set[str] = frozenset()
) -> tuple[dict | None, float | None]:
  """Shares of the summed op time of one jitted module per stage, from a profiler trace,
  and the share of that time spent in matrix products and convolutions (`matmuls`).

  Ops that run at the same time on several threads all count, so these are shares of the
  work, not of the wall time."""
  files = sorted(Path(trace_dir).rglob("*.trace.json.gz"))
  if not files:
    return None, None
  with gzip.open(files[-1]) as f:
    events = json.load(f).get("traceEvents", [])
  totals = dict.fromkeys(STAGE_NAMES, 0.0)
  in_matmuls = 0.0
  for e in events:
    a = e.get("args") or {}
    op = a.get("hlo_op")
    if e.get("ph") != "X" or not op or module_hint not in str(a.get("hlo_module", "")):
      continue
    dur = float(e.get("dur", 0.0))
    totals[stages.get(op, "other")] += dur
    in_matmuls += dur if op in matmuls else 0.0
  total = sum(totals.values())
  if total <= 0:
    return None, None
  return {k: v / total for k, v in totals.items()}, in_matmuls / total


def environment() -> dict:
  d = jax.devices()
  return {
      "jax": jax.__version__,
      "jaxlib": jaxlib.__version__,
      "platform": d[0].platform,
      "device_kind": d[0].device_kind,
      "device_count": len(d),
      "python": platform.python_version(),
      "host": platform.machine(),
      "cpu_count": os.cpu_count(),
      "loadavg_1min": loadavg(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }


def memory_bandwidth(dev, megabytes: int = 64, reps: int = 10) -> dict:
  """Bytes/s of a streaming read + write (y = x + 1 over `megabytes` of float32) on `dev`,
  best of `reps`: the memory bandwidth the scaling model charges XLA's bytes accessed at."""
  n = megabytes * 2**20 // 4
  x = jax.device_put(jnp.zeros((n,), jnp.float32), dev)
  f = jax.jit(lambda x: x + 1.0)
  jax.block_until_ready(f(x))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(x))
    times.append(time.perf_counter() - t0)
  return {"bytes": 2 * 4 * n, "bytes_per_s": 2 * 4 * n / min(times), "min_s": min(times)}
