"""The scaling study's pieces below the command (cras_jax/scaling.py): the steps one device
count compiles (and measures), the projections on the named systems, and the report."""

from __future__ import annotations

import os
import types

import jax

from cras_jax import backbones
from cras_jax.engine import resident, steps
from cras_jax.perf import probes, roofline, rows, systems, tpu

GB = 1e9

OPTIMISER_NOTE = (
    "Optimiser semantics: the loss is a mean over the global batch (the gradient all-reduce "
    "sums per-device shares of it) and the learning rates are the config's, unchanged when the "
    "global batch changes (no linear scaling rule); a larger global batch is fewer, less noisy "
    "steps per epoch at the same learning rate. Weak scaling keeps the batch per device (the "
    "global batch grows with the devices: the optimisation changes); strong scaling keeps the "
    "global batch (the same optimisation, split finer)."
)


# The host's side of a training step, measured on the development CPU (2 cores shared with
# other jobs, 1-minute load average 4-8; docs/performance.md "The training loop end to end") by
# `python -m cras_jax.benchmark`, for the end-to-end projections (roofline.end_to_end) when the
# scaling command's flags give none. The rates are per byte so that they carry to other image
# and feature sizes (an assumption: a read or a gather costs per byte). A server host's cores
# and memory are faster than these; the flags take its own figures.
MEASURED_HOST = {
    # one BatchReader worker, random 288 px images, batch 32: 1,790 images/s (1,548-2,172 over
    # 6 runs of `--modes= --loader_workers=1,2 --image_size=288 --batch_sizes=32`) x 248,836
    # bytes
    "loader_bytes_per_s_per_worker": 1790 * 248_836,
    # train_batches' gather of WRN50-2's stored features (1296 x 1536 float16 = 3,981,316 bytes
    # per image) from the memory-mapped cache, and their transfer, in one thread, batch 32:
    # 170 images/s (102-303 over 9 runs; the same command's feature-gather line)
    "gather_bytes_per_s": 170 * 3_981_316,
    # the loop thread's work per step, WRN50-2 288 px (loop rows, median of 3 runs: dispatch
    # 1.35 / 1.77 ms, and the log's 0.6-1.0 ms every train.log_every = 20 steps)
    "dispatch_s": {"train": 1.4e-3, "train_cached": 1.8e-3},
    "source": (
        "the development CPU: loader 1,790 images/s per worker at 288 px, stored-feature gather "
        "0.68 GB/s in one thread, loop thread 1.4 / 1.8 ms per step (WRN50-2)"
    ),
}


def host_feeds(
    config,
    num_classes: int,
    modes,
    loader_images_per_s_per_worker: float = 0.0,
    gather_images_per_s: float = 0.0,
    dispatch_s: float = 0.0,
    loader_workers_per_host: int = 0,
) -> dict:
  """{training mode: roofline.HostFeed} of `config`'s steps: the bytes the host sends per
  image (rows.input_bytes_per_image), the loader's rate per thread (the image reader, one
  worker per host thread or `loader_workers_per_host`; the stored features' gather, one
  thread per host) and the loop thread's time per step; a figure not given (0) is
  MEASURED_HOST's, per byte for the rates."""

  spec = steps.ModelSpec(config, num_classes)
  out = {}
  for mode in modes:
    if mode not in ("train", "train_cached"):
      continue
    nbytes = rows.input_bytes_per_image(mode, config, spec)
    given = {"train": loader_images_per_s_per_worker, "train_cached": gather_images_per_s}[mode]
    per_byte = MEASURED_HOST[
        "loader_bytes_per_s_per_worker" if mode == "train" else "gather_bytes_per_s"
    ]
    rate = given or (per_byte / nbytes if per_byte else None)
    step_s = dispatch_s or MEASURED_HOST["dispatch_s"][mode]
    measured = [x for x, flag in ((rate, given), (step_s, dispatch_s)) if x and not flag]
    out[mode] = roofline.HostFeed(
        bytes_per_image=nbytes,
        loader_images_per_s_per_thread=rate,
        threads="host" if mode == "train" else "one",
        loader_threads_per_host=loader_workers_per_host or None,
        dispatch_s=step_s,
        source=(MEASURED_HOST["source"] if measured else "given by flags"),
    )
  return out


def series(devices: list[int], batch_per_device: list[int], global_batch: list[int]):
  """(scaling, n, global batch) of every step the study compiles: weak scaling at each batch
  per device, strong scaling at each global batch (counts that do not divide it skipped)."""
  out = []
  for b in batch_per_device:
    out += [(f"weak b{b}/device", n, b * n) for n in devices]
  for g in global_batch:
    out += [(f"strong B{g}", n, g) for n in devices if g % n == 0]
  return out


def run_count(config, args, n: int, plan: list[tuple], measure: bool) -> list[dict]:
  """Compiles every (mode, global batch) of `plan` on the first `n` devices; when `measure`,
  also times the step of the first batch (random weights, a short timed loop)."""
  devs = jax.devices()[:n]
  batches = sorted({g for _, m, g in plan if m == n})
  out, vars_ = [], None
  counter = probes.CompileCounter() if measure else None
  for g in batches:
    for mode in args.modes:
      tpu.boundary(f"compiling {mode} on {n} device(s), batch {g}")
      facts = tpu.compile_or_refusal(mode, config, devs, g, args.num_classes)
      rec = {"mode": mode, "devices": n, "global_batch": g, "facts": facts}
      if measure and g == batches[0] and "refused" not in facts:
        if vars_ is None:
          vars_ = jax.device_get(
              backbones.load_variables(config.model.backbone, "random", config.data.crop, 0)
          )
        bench = types.SimpleNamespace(
            seed=0, num_batches=1, breakdown=False, profile=False, reps=args.reps,
            steps_per_rep=1, min_rep_seconds=0.0, out=args.out,
        )  # fmt: skip
        row = rows.bench_row(mode, config, bench, devs, g, args.num_classes, vars_, counter)
        rec["measured_step_s"] = row["median_s"]
        rec["measured_images_per_s"] = row["images_per_s"]
      out.append(rec)
      if "refused" in facts:
        print(
            f"{n} dev, batch {g}, {mode}: does not fit: the compiler refused it "
            f"({facts['refused']})",
            flush=True,
        )
        continue
      print(
          f"{n} dev, batch {g}, {mode}: {facts['flops'] or 0:.3g} FLOP/device, "
          f"{facts['bytes_accessed'] or 0:.3g} B accessed, collectives {facts['collectives']}"
          + (
              f", measured {rec['measured_step_s'] * 1e3:.1f} ms"
              if "measured_step_s" in rec
              else ""
          ),
          flush=True,
      )
  if counter is not None:
    counter.close()
  return out


def project_all(
    compiled: list[dict], plan, system_list, dtype: str, loader, local_memory=None, feeds=None
) -> list[dict]:
  """Every planned step on every system, with efficiencies (roofline.add_efficiency) and
  whether it fits the system's memory (`memory_fit`; `local_memory`: (bytes, what) of this
  machine's measured system, which has no memory figure of its own). A row that does not fit
  has no images/s (`withhold_unfit`). Each row also has its end-to-end images/s with the host's
  terms (`add_end_to_end`; `feeds`: {mode: roofline.HostFeed} of the training modes)."""
  by_key = {(r["mode"], r["devices"], r["global_batch"]): r for r in compiled}
  out = []
  for scaling, n, g in plan:
    for mode in sorted({r["mode"] for r in compiled}):
      rec = by_key.get((mode, n, g))
      if rec is None:
        continue
      for system in system_list:
        if "refused" in rec["facts"]:
          p = refused_projection(system.name, n, g)
        else:
          p = roofline.project(rec["facts"], system, dtype, n, g, loader)
        p.update(mode=mode, scaling=scaling)
        p.update(memory_fit(rec["facts"], system, n, local_memory))
        if system.name == "this CPU" and "measured_step_s" in rec:
          p["measured_step_s"] = rec["measured_step_s"]
          p["measured_images_per_s"] = rec["measured_images_per_s"]
          p["measured_over_projected"] = rec["measured_step_s"] / p["step_s"]
        out.append(p)
  roofline.add_efficiency([p for p in out if p["images_per_s"] is not None])
  return add_end_to_end(withhold_unfit(out), {s.name: s for s in system_list}, feeds)


def add_end_to_end(projections: list[dict], by_name: dict, feeds: dict | None) -> list[dict]:
  """Each projection with its host terms and end-to-end images/s (roofline.end_to_end) on
  its system (`by_name`: name -> systems.System, whose host figures count per chip; a row's
  `devices` are its chips), the feed of its mode (`feeds`; none: the step alone)."""
  for p in projections:
    feed = (feeds or {}).get(p["mode"])
    p.update(roofline.end_to_end(p, by_name[p["system"]], p["devices"], p["global_batch"], feed))
  return projections


def memory_fit(
    facts: dict, system: systems.System, n_devices: int, local_memory=None, unit: str = "device"
) -> dict:
  """Whether a compiled step fits `system`'s memory: its memory analysis's footprint per
  device (`facts`: rows.compiled_facts) against the system's memory per device (a GPU's or a
  TPU chip's HBM); on a system without that figure (this machine's, measured) against
  `local_memory`, (bytes, what): the host's available memory, of which simulated devices
  sharing the host (`system.shared`) need n footprints. -> {"fits": True, False or None (no
  memory analysis, or no capacity to compare with), "fits_memory" (the same),
  "memory_needed_bytes", "memory_available_bytes", "does_not_fit": why it does not (None
  where it fits or is unknown)}. A step the compiler refused (`facts["refused"]`) does not
  fit."""
  need = (facts.get("memory") or {}).get("footprint_bytes")
  cap, what = system.memory_per_device_bytes, f"per {unit}"
  if cap is None and local_memory and local_memory[0]:
    cap, what = local_memory[0], f"of {local_memory[1]}"
    if system.shared and need is not None:
      what += f", for {n_devices} simulated device(s) of {resident.gb(need)} each"
      need *= n_devices
  if facts.get("refused"):
    fits, why = False, f"the compiler refused it: {facts['refused']}"
  elif need is None or not cap:
    fits, why = None, None
  else:
    fits = bool(need <= cap)
    why = None if fits else f"{resident.gb(need)} > {resident.gb(cap)} {what}"
  return {
      "fits": fits,
      "fits_memory": fits,
      "memory_needed_bytes": need,
      "memory_available_bytes": cap,
      "does_not_fit": why,
  }


def refused_projection(system: str, n: int, g: int) -> dict:
  """The projection of a step the compiler refused for memory: nothing to project."""
  return {
      "system": system,
      "devices": n,
      "global_batch": g,
      "compute_s": None,
      "memory_s": None,
      "collective_s": None,
      "host_overhead_s": None,
      "step_s": None,
      "images_per_s": None,
      "binding": None,
      "input_images_per_s_needed": None,
      "loader_bound": False,
      "efficiency": None,
  }


def withhold_unfit(projections: list[dict]) -> list[dict]:
  """A row whose step does not fit (`fits` False) could not run: its images/s, the input rate
  it needs and its efficiency are withheld (None; the roofline's figure stays as
  `images_per_s_if_it_fit`), and it is not loader-bound. Rows of a series whose 1-device row
  does not fit have no efficiency (nothing to compare with)."""
  unfit_base = {
      (p["system"], p["mode"], p["scaling"])
      for p in projections
      if p["devices"] == 1 and p.get("fits") is False
  }
  for p in projections:
    if p.get("fits") is False:
      if p["images_per_s"] is not None:
        p["images_per_s_if_it_fit"] = p["images_per_s"]
      p.update(images_per_s=None, input_images_per_s_needed=None, loader_bound=False)
      p["efficiency"] = None
    elif (p["system"], p["mode"], p["scaling"]) in unfit_base:
      p["efficiency"] = None
  return projections


def worker_env(n: int) -> dict:
  """The environment of a worker process simulating `n` CPU devices."""
  flags_ = os.environ.get("XLA_FLAGS", "").split()
  flags_ = [f for f in flags_ if not f.startswith("--xla_force_host_platform_device_count")]
  flags_.append(f"--xla_force_host_platform_device_count={n}")
  return dict(os.environ, XLA_FLAGS=" ".join(flags_), JAX_PLATFORMS="cpu")
