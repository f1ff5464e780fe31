"""The step loop a single run and a population share (`training.train`, `training.population`).

The data order is a pure function of (seed, epoch) (`epoch_order`, `batch_indices`), so a
resumed run sees the batches it would have seen; a population's members draw one order or
each their own (`train_batches`). `run_steps` takes the steps from a given one
to the end: a checkpoint at every epoch end, every `train.checkpoint_every_steps`, at the last
step and on a stop request (SIGINT/SIGTERM between steps: exit 130/143, the run resumes from
it); a training-log window every `train.log_every` steps and before every checkpoint, its NaN
guard first, so a diverged state is never saved; evaluations between epochs. What differs
between a single run and a population (the guard, the log, the evaluation) comes in as
functions (`Hooks`).
"""

from __future__ import annotations

import dataclasses
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from cras_jax.base import stop as stop_lib
from cras_jax.results import tables as results
from cras_jax.runs import checkpoint

StopRequest = stop_lib.StopRequest  # SIGINT/SIGTERM -> stop between steps


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
  """Shuffled indices of one epoch, a pure function of (seed, epoch)."""
  return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(
    seed: int, step: int, n: int, batch_size: int, multiple: int = 1
) -> tuple[int, np.ndarray]:
  """(epoch, indices) of global step `step`; the last batch of an epoch is kept
  (trimmed to a multiple of the device count)."""
  steps_per_epoch = math.ceil(n / batch_size)
  epoch, i = divmod(step, steps_per_epoch)
  idx = epoch_order(seed, epoch, n)[i * batch_size : (i + 1) * batch_size]
  keep = (len(idx) // multiple) * multiple
  return epoch, idx[: max(keep, multiple)] if keep else idx[:0]


def prefetch(iterator, size: int = 2):
  """Runs `iterator` in a background thread, `size` items ahead."""
  q: queue.Queue = queue.Queue(maxsize=size)
  sentinel = object()

  def worker():
    try:
      for item in iterator:
        q.put(item)
    except BaseException as e:  # surfaced in the consumer
      q.put(e)
    q.put(sentinel)

  threading.Thread(target=worker, daemon=True).start()
  while True:
    item = q.get()
    if item is sentinel:
      return
    if isinstance(item, BaseException):
      raise item
    yield item


def train_batches(
    start: int,
    total: int,
    seed,
    batch_size: int,
    devices,
    labels,
    cache=None,
    reader=None,
    resident=None,
) -> Iterator[tuple[int, dict]]:
  """(step, batch on the devices) from step `start` to `total`: stored features (`cache`,
  the training images' features in train order) or images (`reader`, a `loader.BatchReader`);
  this process's share of each global batch. With `resident` (`engine.resident.Resident`: the
  same rows already on the devices), only the indices leave the host and the batch is gathered
  there: the same batch.

  seed: the seed of the data order (an int), or one seed per member of a population
  (a sequence: `train.member_data_order` "per_member"): then every member's batch is the one a
  single run of its seed reads at that step, stacked on a leading member axis
  (`devices.put_member_batch`)."""
  n = len(labels)
  per_member = not isinstance(seed, (int, np.integer))
  seeds = [int(s) for s in seed] if per_member else [int(seed)]
  key = "features" if cache is not None else "image"
  for s in range(start, total):
    parts = []
    for order in seeds:
      _, idx = batch_indices(order, s, n, batch_size, devices.count)
      if resident is not None:  # the global indices; this process's labels
        parts.append({"index": idx, "label": labels[idx[devices.local_slice(len(idx))]]})
        continue
      idx = idx[devices.local_slice(len(idx))]
      if cache is not None:
        parts.append(
            {
                "features": np.asarray(cache[np.sort(idx)])[np.argsort(np.argsort(idx))],
                "label": labels[idx],
            }
        )
      else:
        parts.append(reader.read(idx, ("image", "label")))
    host = {k: np.stack([p[k] for p in parts]) for k in parts[0]} if per_member else parts[0]
    put = devices.put_member_batch if per_member else devices.put_batch
    if resident is not None:  # the rows gathered on the devices, the labels put from here
      index = host.pop("index")
      yield s, {key: resident.take(index), **put(host)}
    else:
      yield s, put(host)


@dataclasses.dataclass
class Hooks:
  """What a loop does that depends on what it trains."""

  check: Callable[[list, int], None]  # (window, step): raise on a non-finite loss or gradient
  log: Callable[[list, int], dict]  # (window, step): write the window -> the metrics shown
  evaluate: Callable[[Any, int], None]  # (state, epoch) at an epoch end before the last
  on_stop: Callable[[], None] = lambda: None  # before exiting on a stop request
  desc: str = "train"
  shown_suffix: str = ""  # after the metrics on the progress bar


def run_steps(
    state,
    train_step: Callable,
    batches: Iterator[tuple[int, dict]],
    config,
    start: int,
    steps_per_epoch: int,
    mngr,
    meta: dict,
    stop: StopRequest,
    hooks: Hooks,
) -> tuple[Any, dict]:
  """Trains from step `start` to `config.train.epochs * steps_per_epoch`. -> (state, the last
  window's metrics)."""
  t = config.train
  total = t.epochs * steps_per_epoch
  eval_every = t.eval_every or (1 if config.eval.protocol == "best_epoch" else 0)
  bar = results.progress(total=total, initial=start, desc=hooks.desc)
  window, last = [], {}
  for s, batch in prefetch(batches):
    t0 = time.time()
    state, metrics = train_step(state, batch)
    window.append((metrics, batch["label"].shape[-1], t0))  # images a member saw
    done = s + 1
    end_of_epoch = done % steps_per_epoch == 0
    save_now = (
        end_of_epoch
        or done == total
        or (t.checkpoint_every_steps and done % t.checkpoint_every_steps == 0)
        or stop.signum is not None
    )
    if save_now or len(window) >= t.log_every:
      hooks.check(window, done)  # before any save: never checkpoint a diverged state
      last = hooks.log(window, done)
      window = []
      bar.set_postfix_str(results.format_train_metrics(last) + hooks.shown_suffix)
    bar.update(1)
    if save_now:
      checkpoint.save(mngr, done, state.checkpointable(), meta)
    if stop.signum is not None:
      bar.close()
      hooks.on_stop()
      print(
          f"stopped at step {done}/{total}; checkpoint saved. Rerun the same command to resume.",
          flush=True,
      )
      raise SystemExit(128 + stop.signum)
    epoch = done // steps_per_epoch
    if end_of_epoch and eval_every and epoch % eval_every == 0 and done != total:
      hooks.evaluate(state, epoch)
  bar.close()
  return state, last
