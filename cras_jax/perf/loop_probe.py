"""The training loop end to end, as `python -m cras_jax.main` runs it (the benchmark's loop
rows, cras_jax/perf/benchmark.py), beside the compiled step alone.

One row drives `training.loop.run_steps` itself: batches from `loop.train_batches` (a
`loader.BatchReader` over a prepared dataset of random images for `train`; for `train_cached`
the features gathered from a memory-mapped feature cache written by `runs.feature_cache`),
through the loop's `prefetch` thread, the step as training compiles it
(`Devices.compile_train`, `train.deterministic`), and a single run's hooks
(`training.train.run_hooks`: the NaN check and the training log, with its TensorBoard scalars,
every `train.log_every` steps), in a workdir of its own in a temporary folder. The
run has one epoch of `warm + reps x steps_per_rep` steps: its only checkpoint is saved after
its last step, outside the timed steps. Nothing of the loop is rewritten here: the step, the
batches and the hooks are wrapped, only to record when each was called and returned.

What is timed (all `time.perf_counter`, on this process's clock):
- each step's dispatch: the call of the jitted step (it returns once the step is enqueued);
- each step's completion: a watcher thread blocks on the step's metrics and records when they
  are ready (the outputs of one program are ready together). When the loop's thread holds the
  interpreter lock at that moment the record comes late, by at most the interpreter's switch
  interval (5 ms by default), so the waits below are a lower bound by up to that much;
- the hooks' calls (check, log) and, in the prefetch thread, each batch's production (read or
  gather, and the transfer to the devices).

From these, per rep of `steps_per_rep` consecutive steps i (a multiple of `train.log_every`, so
that every rep holds the same number of log windows):
- loop time per step: (ready(last) - ready(first - 1)) / steps; images/s = batch / that;
- the device's wait for the host before step i: max(0, dispatch returned(i) - ready(i - 1)),
  the time from the previous step's result being ready to this step being enqueued; the host's
  share is the sum of these waits over the rep's wall time;
- the loop thread's own work per step (`host_work_s`): the median dispatch call plus the log
  hook's time per step (the check hook's time is mostly its wait for the device, which is not
  host work and is kept apart as `check_s_per_step`); this is the "dispatch" term of the
  scaling model's end-to-end projection (cras_jax/perf/roofline.py `end_to_end`);
- the time the loop thread waited for a batch (`next_wait_s_per_step`): the gaps between one
  step's dispatch returning and the next step's call, less the hooks' time in them.
The batches' production alone (no step running) is timed first, as the loader's own rate.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import queue
import tempfile
import threading
import time
import types

import jax
import numpy as np
from absl import logging

from cras_jax import data as data_lib
from cras_jax.config import population as population_lib
from cras_jax.data import loader
from cras_jax.engine import sharding, steps
from cras_jax.perf import loader_probe, probes, rows
from cras_jax.runs import checkpoint, feature_cache
from cras_jax.training import loop, on_device
from cras_jax.training import train as train_lib

TRAIN_MODES = ("train", "train_cached")


class _Clock:
  """The step, wrapped: when each call began and returned, and (a watcher thread blocking on
  each step's metrics in order) when each step's outputs were ready."""

  def __init__(self, step):
    self.step = step
    self.calls: list[tuple[float, float]] = []
    self.ready: list[float] = []
    self._pending: queue.SimpleQueue = queue.SimpleQueue()
    self._thread = threading.Thread(target=self._watch, daemon=True)
    self._thread.start()

  def __call__(self, state, batch):
    t0 = time.perf_counter()
    state, metrics = self.step(state, batch)
    self.calls.append((t0, time.perf_counter()))
    self._pending.put(metrics)
    return state, metrics

  def _watch(self) -> None:
    while (metrics := self._pending.get()) is not None:
      jax.block_until_ready(metrics)
      self.ready.append(time.perf_counter())

  def close(self) -> None:
    self._pending.put(None)
    self._thread.join()


def _timed(fn, out: list):
  def wrapped(*a):
    t0 = time.perf_counter()
    result = fn(*a)
    out.append((t0, time.perf_counter()))
    return result

  return wrapped


def _timed_batches(batches, out: list):
  """`batches`, recording each item's production time (in the thread that iterates it)."""
  while True:
    t0 = time.perf_counter()
    try:
      item = next(batches)
    except StopIteration:
      return
    out.append(time.perf_counter() - t0)
    yield item


def dataset_size(batch_size: int, images: int) -> int:
  """At least `images`, a whole number of batches (every batch of the loop is full)."""
  return batch_size * max(2, -(-images // batch_size))


def make_cache(root: str, n: int, spec, dtype: str, seed: int = 0) -> np.ndarray:
  """A feature cache of `n` images' random features (the step's shape and `dtype`), written
  and committed by `runs.feature_cache.Writer` (memory-mapped, as training reads it)."""
  shape = (n, spec.num_patches, spec.heads.embed_dim)
  writer = feature_cache.Writer(os.path.join(root, "features", "train_bench.npy"), shape, dtype)
  rng = np.random.default_rng(seed)
  for i in range(n):
    writer.array[i] = rng.standard_normal(shape[1:], np.float32).astype(writer.array.dtype)
  return writer.commit()


def _data(mode: str, config, spec, root: str, n: int, sources: dict):
  """(labels, cache, reader) of `loop.train_batches` for `mode`: a prepared dataset of `n`
  random images at the crop (kept in `sources` for the next row of the same size), or a
  feature cache of `n` images."""
  size = int(config.data.crop)
  if mode == "train":
    if (size, n) not in sources:
      sources[(size, n)] = loader_probe.synthetic_source(
          os.path.join(root, f"data_{size}_{n}"), size, n
      )
    source = sources[(size, n)]
    return data_lib.class_indices(source), None, loader.BatchReader(source, config.data.workers)
  labels = np.zeros((n,), np.int32)
  cache = make_cache(root, n, spec, config.train.feature_cache_dtype)
  return labels, cache, None


def producer_rate(
    devices, labels, cache, reader, batch_size: int, seconds: float, resident=None
) -> float:
  """images/s of `loop.train_batches` alone (read or gather, and the transfer to the devices;
  with `resident`, the gather on the devices; no step), over about `seconds` after one batch of
  warm-up."""
  batches = loop.train_batches(0, 10**9, 1, batch_size, devices, labels, cache, reader, resident)
  jax.block_until_ready(next(batches)[1])
  images, t0 = 0, time.perf_counter()
  while images < 2 * batch_size or time.perf_counter() - t0 < seconds:
    _, batch = next(batches)
    jax.block_until_ready(batch)
    images += batch["label"].shape[0]
  return images / (time.perf_counter() - t0)


def loop_row(
    mode: str,
    config,
    args,
    devs,
    batch_size: int,
    num_classes: int,
    backbone_vars,
    root: str,
    sources: dict,
) -> dict:
  """One end-to-end row (module doc): `mode` train or train_cached, timed over
  `args.reps` reps of `loop_steps(args, config)` steps after `args.loop_warm_steps`; data and
  the run's workdir under `root`."""
  if mode not in TRAIN_MODES:
    raise ValueError(f"no training loop for mode {mode!r}")
  config = copy.deepcopy(config)
  config.train.cache_features = mode == "train_cached"
  devices = sharding.Devices(list(devs), config.train.parallelism)
  spec = steps.ModelSpec(config, num_classes)
  n = dataset_size(batch_size, args.loop_images)
  load0 = probes.loadavg()
  labels, cache, reader = _data(mode, config, spec, root, n, sources)
  try:
    state = rows.initial_state(
        spec, backbone_vars, args.seed, devices, np.random.default_rng(args.seed)
    )
    step = devices.compile_train(spec, deterministic=config.train.deterministic)
    # data.on_device as training decides it: the batches gathered on the devices, or read here
    resident = on_device.place(config, devices, step, state, n, cache, reader)
    alone = producer_rate(
        devices, labels, cache, reader, batch_size, args.min_rep_seconds, resident
    )
    per_rep = loop_steps(args, config)
    warm = max(1, args.loop_warm_steps)
    total = warm + args.reps * per_rep
    config.train.epochs, config.train.checkpoint_every_steps = 1, 0  # one save, after the end
    workdir = tempfile.mkdtemp(dir=root, prefix=f"run_{mode}_")
    checks, logs, produced = [], [], []
    hooks, board = train_lib.run_hooks(config, workdir, total, lambda state, epoch: None)
    hooks = dataclasses.replace(
        hooks, check=_timed(hooks.check, checks), log=_timed(hooks.log, logs)
    )
    clock = _Clock(step)
    batches = loop.train_batches(
        0,
        total,
        population_lib.order_seed(config),
        batch_size,
        devices,
        labels,
        cache,
        reader,
        resident,
    )
    mngr = checkpoint.manager(workdir, 1)
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.WARNING)  # as cras_jax.main: orbax logs every save at INFO
    cpu0, wall0 = probes.cpu_seconds(), time.perf_counter()
    try:
      loop.run_steps(
          state,
          clock,
          _timed_batches(batches, produced),
          config,
          0,
          total,
          mngr,
          {},
          types.SimpleNamespace(signum=None),
          hooks,
      )
    finally:
      logging.set_verbosity(verbosity)
      clock.close()
      board.close()
    cpu_util = (probes.cpu_seconds() - cpu0) / (time.perf_counter() - wall0)
  finally:
    if reader is not None:
      reader.close()
  timing = analyse(
      clock.calls, clock.ready, checks, logs, warm, per_rep, args.reps, int(config.train.log_every)
  )
  return {
      "mode": mode,
      "parallelism": devices.parallelism,
      "backbone": config.model.backbone,
      "image_size": spec.image_size,
      "embed_dim": int(config.model.embed_dim),
      "dtype": config.model.dtype,
      "devices": devices.count,
      "batch_size": batch_size,
      "platform": devs[0].platform,
      "device_kind": devs[0].device_kind,
      "dataset_images": n,
      "on_device": resident is not None,
      "reader_workers": reader.workers if reader is not None and resident is None else None,
      "feature_cache_dtype": config.train.feature_cache_dtype if cache is not None else None,
      "bytes_per_image": rows.input_bytes_per_image(mode, config, spec),
      "log_every": int(config.train.log_every),
      "warm_steps": warm,
      "reps": args.reps,
      "steps_per_rep": per_rep,
      **timing,
      "images_per_s": batch_size / timing["median_s"],
      "images_per_s_best": batch_size / timing["min_s"],
      "producer_alone_images_per_s": alone,
      "producer_s_per_batch": float(np.median(produced[warm:])) if produced[warm:] else None,
      "process_cpu_per_wall_s": cpu_util,
      "loadavg_1min_start": load0,
      "loadavg_1min_end": probes.loadavg(),
  }


def loop_steps(args, config) -> int:
  """Steps per rep: `--loop_steps`, else twice `train.log_every`; rounded up to a multiple of
  `train.log_every` (every rep then holds the same number of log windows)."""
  every = max(1, int(config.train.log_every))
  want = args.loop_steps or 2 * every
  return every * -(-want // every)


def analyse(calls, ready, checks, logs, warm: int, per_rep: int, reps: int, log_every: int) -> dict:
  """The timings of the steps after the first `warm` (module doc), per rep and summarised."""
  last = warm + reps * per_rep
  if len(ready) < last or len(calls) < last:
    raise RuntimeError(
        f"the loop ran {len(calls)} steps, {len(ready)} completed; expected " f"{last}"
    )
  step_times, shares, waits = [], [], []
  for r in range(reps):
    a = warm + r * per_rep
    b = a + per_rep
    span = ready[b - 1] - ready[a - 1]
    wait = sum(max(0.0, calls[i][1] - ready[i - 1]) for i in range(a, b))
    step_times.append(span / per_rep)
    shares.append(wait / span if span > 0 else 0.0)
    waits.append(wait / per_rep)
  # The loop thread between the timed steps' dispatches: the gaps, and the hooks inside them.
  t0, t1 = calls[warm][1], calls[last - 1][0]

  def inside(spans):
    return [e - s for s, e in spans if s >= t0 and e <= t1]

  gaps = [calls[i][0] - calls[i - 1][1] for i in range(warm + 1, last)]
  check_s, log_s = inside(checks), inside(logs)
  dispatch = [e - s for s, e in calls[warm:last]]
  log_per_step = float(np.mean(log_s)) / log_every if log_s else 0.0
  out = probes.stats(step_times)
  out.update(
      host_share=float(np.median(shares)),
      host_share_min=float(np.min(shares)),
      host_share_max=float(np.max(shares)),
      rep_host_shares=[float(x) for x in shares],
      device_wait_s_per_step=float(np.median(waits)),
      dispatch_s=float(np.median(dispatch)),
      dispatch_s_max=float(np.max(dispatch)),
      check_s_per_step=float(np.mean(check_s)) / log_every if check_s else 0.0,
      log_s_per_step=log_per_step,
      next_wait_s_per_step=max(0.0, sum(gaps) - sum(check_s) - sum(log_s)) / max(1, len(gaps)),
      host_work_s=float(np.median(dispatch)) + log_per_step,
  )
  return out


def measure_loader(args, sizes: list[int], devs, base=None, num_classes: int = 4) -> list[dict]:
  """The loader's images/s at each image size and worker count (perf/loader_probe.py), and,
  with the config `base`, the stored features' gather of the training loop (one thread, as
  `loop.train_batches` runs in the prefetch thread) from a feature cache of the config's model
  at that size (producer_rate)."""
  out = []
  bs = args.batch_sizes[0]
  for size in sizes:
    with tempfile.TemporaryDirectory() as tmp:
      source = loader_probe.synthetic_source(tmp, size, max(64, 2 * bs))
      for w in args.loader_workers:
        r = loader_probe.loader_rate(source, bs, w, devs)
        r.update(image_size=size, kind="reader", bytes_per_image=size * size * 3 + 4)
        out.append(r)
        print(f"loader {size}px, {r['workers']} workers: {r['images_per_s']:.0f} images/s")
      if base is None:
        continue
      config = rows.configure(base, args, size, base.model.dtype)
      spec = steps.ModelSpec(config, num_classes)
      n = dataset_size(bs, 64)
      cache = make_cache(tmp, n, spec, config.train.feature_cache_dtype)
      devices = sharding.Devices(devices=list(devs))
      rate = producer_rate(devices, np.zeros((n,), np.int32), cache, None, bs, 2.0)
      nbytes = rows.input_bytes_per_image("train_cached", config, spec)
      out.append({
          "kind": "gather", "workers": 1, "batch_size": bs, "images_per_s": rate,
          "image_size": size, "bytes_per_image": nbytes,
          "features": f"{spec.num_patches} x {spec.heads.embed_dim} "
                      f"{config.train.feature_cache_dtype}",
      })  # fmt: skip
      print(f"feature gather {size}px ({out[-1]['features']}), one thread: {rate:.0f} images/s")
  return out


def beside_step(loop_row: dict, step_row: dict) -> None:
  """The loop row against the step alone of the same mode and shape (`step_row`): its median
  step time, the loop's time per step over it, and the host's share implied by the two
  (1 - step / loop: the device's wait if the step takes the same time in both)."""
  step = step_row["median_s"]
  loop_row["step_only_median_s"] = step
  loop_row["step_only_images_per_s"] = step_row["images_per_s"]
  loop_row["loop_over_step"] = loop_row["median_s"] / step
  loop_row["host_share_implied"] = 1.0 - step / loop_row["median_s"]
