"""Training: the loop around the jitted, sharded train step, for a single run and a population.

`train_and_evaluate` trains CRAS in a workdir (resuming from its latest checkpoint) and
evaluates it under the configured protocol: one model (`SingleRun`), or with `train.population`
every member of a population (`training.population`); both go through one driver
(`_train_and_evaluate`), to which they pass what differs (`Trainee`). Before the first step, one
pass of the frozen backbone over the training set (`feature_pass`) gives the class centres and
the feature scale (`compute_centres`) and, with `train.cache_features`, the stored features the
steps then train on. The step loop is `training.loop`: the data order is a pure function of
(seed, epoch), so a resumed run repeats an uninterrupted one exactly; SIGINT/SIGTERM stop
between steps.
In the single-class setting `train_and_evaluate` and `evaluate_checkpoint` (`--mode=eval`) loop
over the classes here, one model each, and gather one table (`runs/single_class.py`).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cras_jax import data as data_lib
from cras_jax.base import fs, progress
from cras_jax.base import stop as stop_lib
from cras_jax.config import check as config_check
from cras_jax.config import population as population_lib
from cras_jax.data import loader
from cras_jax.engine import population, sharding, steps
from cras_jax.method import centres as centres_lib
from cras_jax.results import summaries
from cras_jax.results import tables as results
from cras_jax.runs import checkpoint, feature_cache, named_inputs, single_class, specs
from cras_jax.runs import workdir as runs
from cras_jax.scoring import evaluate, scoring
from cras_jax.training import loop, on_device
from cras_jax.training import population as population_training


def feature_pass(
    state: steps.TrainState,
    spec: steps.ModelSpec,
    devices: sharding.Devices,
    dataset,
    config,
    workdir: str,
    members: int = 0,
    batching: str = "auto",
):
  """One pass over the training set with the frozen backbone and the current adapter:
  class sums of u (for the centres) and the moments of u. With
  `train.cache_features`, also returns t of every training image (train order) as a
  memory-mapped array, read from the disk cache when present, else computed and stored.
  members: a population's size (its state stacked; sums and moments per member), computed in
  the form `batching` (`engine.population.BATCHINGS`).
  """
  n = len(dataset.train)
  bs = config.eval.batch_size
  k, hw, d = state.centres.shape[-3:]
  lead = (members,) if members else ()
  acc = tuple(jnp.zeros(lead + s) for s in ((k, hw, d), (k,), (), ()))
  centre_step = jax.jit(steps.make_centre_step(spec))
  if members and population.resolve_batching(batching) == "vmap":
    centre_step = jax.jit(population.make_centre_step(spec))
  elif members:  # the single run's centre step per member: bit-identical centres
    centre_step = population.make_member_centre_loop(centre_step)
  heads = state.replace(backbone=None) if members else state
  embed_step = jax.jit(steps.make_embed_step(spec))
  labels = data_lib.class_indices(dataset.train)
  centre_w = centres_lib.centre_weights(labels, config.model.centre)
  feats = writer = None
  if config.train.cache_features:
    cache_spec = specs.cache_spec(config)
    data_cache = data_lib.cache_dir(specs.data_spec(config), workdir)
    file = feature_cache.path(cache_spec, data_cache, feature_cache.key(cache_spec, dataset))
    feats = feature_cache.load(file, (n, hw, d))
    if feats is not None:
      print(f"feature cache: reusing {file}", flush=True)
    else:
      dtype = config.train.feature_cache_dtype
      print(
          f"feature cache: writing {feature_cache.describe_size((n, hw, d), dtype)} to {file}",
          flush=True,
      )
      writer = feature_cache.Writer(file, (n, hw, d), dtype, dataset.data_dir)
  bar = progress.bar(n, desc="features" if writer is not None else "centres", unit="img")
  try:
    for start in range(0, n, bs):
      stop_lib.poll("the feature pass", "nothing of it is kept; rerun the same command")
      idx = np.arange(start, min(start + bs, n))
      pad, weight = data_lib.padded_indices(idx, bs, devices.count)
      local = devices.local_slice(len(pad))
      if feats is not None:  # from the cache, as training will see it
        t = devices.put_batch({"t": np.asarray(feats[pad[local]])})["t"]
      else:
        images = data_lib.get_batch(dataset.train, pad[local], ("image",))["image"]
        t = embed_step(state, devices.put_batch({"image": images})["image"])
        if writer is not None:
          writer.array[idx] = devices.gather(t)[: len(idx)].astype(writer.array.dtype)
      lw = devices.put_batch(
          {
              "label": labels[pad[local]],
              "weight": weight[local],
              "centre_weight": centre_w[pad[local]],
          }
      )
      acc = centre_step(acc, heads, t, lw["label"], lw["weight"], lw["centre_weight"])
      bar.update(len(idx))
  except BaseException:
    if writer is not None:
      writer.abort()  # a stopped or failed pass leaves no temporary behind
    raise
  bar.close()
  if writer is not None:
    feats = writer.commit()
  return acc, feats


def compute_centres(state: steps.TrainState, acc, dataset, config) -> steps.TrainState:
  """MCMC centres and the feature std, with the untrained adapter (docs/method.md §4)."""
  sums, counts = acc[:2]
  n = len(dataset.train)
  k = sums.shape[0]
  missing = [dataset.class_names[i] for i in np.flatnonzero(np.asarray(counts) == 0)]
  if missing:
    raise ValueError(f"no training images for classes {missing}")
  centres, noise_std, std = population_training.centre_values(acc, n, config.model.noise_relative)
  how = "means of" if config.model.centre == "mean" else "one image each (w/o MCMC) of"
  print(
      f"centres: {k} classes, {how} {n} images; adapted-feature std {float(std):.4f}; "
      f"noise sigma {config.model.noise_sigma * float(noise_std):.4f}",
      flush=True,
  )
  return state.replace(centres=centres, noise_std=noise_std)


def check_finite(window, done: int) -> None:
  """Stops training at the first non-finite loss or gradient of the window."""
  host = jax.device_get([m for m, _, _ in window])
  first = done - len(window) + 1
  for i, m in enumerate(host):
    bad = [k for k in ("loss", "grad_norm") if not np.isfinite(m[k])]
    if bad:
      raise FloatingPointError(
          f"non-finite {' and '.join(bad)} at step {first + i}: training stopped; the last "
          f"checkpoint (before that step) is kept. Lower the learning rates or check the data."
      )


# ----------------------------------------------------------------------------- a run


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool = False
) -> dict:
  """Trains CRAS (resuming from the workdir's last checkpoint) and evaluates it; with
  `train.population`, every member (`training.population.Population`). -> the run's table (a
  population's: the mean over its members).

  SIGINT/SIGTERM stop training after the current step with a checkpoint (exit
  status 128 + signal); rerunning the same command resumes exactly.
  """
  progress.configure(config)
  config_check.check(config)  # every field, weights and data root: before any data work
  named_inputs.ensure(config)  # weights and data named by the config: fetched once, or the
  # one message of what is missing (before the workdir is created)
  fs.writable_dir(workdir, "--workdir", "give a directory this user can write to")
  if config.train.cache_features and config.train.feature_cache_dir:  # before any data work
    fs.writable_dir(
        os.path.expanduser(config.train.feature_cache_dir),
        "train.feature_cache_dir",
        "set --config.train.feature_cache_dir to a writable directory",
    )
  if config.setting == "single_class":  # one model per class, one after another
    with runs.WorkdirLock(workdir):
      per_class = single_class.single_class_configs(config, workdir)
      for i, (cls, (sub, subdir)) in enumerate(per_class.items()):
        single_class.announce(i, per_class, cls)
        train_and_evaluate(sub, subdir, allow_config_change)
      return single_class.gather(config, workdir, per_class, "final")
  trainee = population_training.Population if config.train.population else SingleRun
  with runs.WorkdirLock(workdir), loop.StopRequest("this step or batch") as stop:
    return _train_and_evaluate(config, workdir, stop, allow_config_change, trainee)


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Scores the workdir's latest checkpoint without training (`--mode=eval`;
  `evaluate.evaluate_checkpoint`), in the single-class setting each class's model, with
  `train.population` every member (`training.population.evaluate_checkpoint`)."""
  config_check.check(config)
  progress.configure(config)
  if config.train.population:
    return population_training.evaluate_checkpoint(config, workdir)
  if config.setting != "single_class":
    return evaluate.evaluate_checkpoint(config, workdir)
  per_class = single_class.single_class_configs(config, workdir)
  for i, (cls, (sub, subdir)) in enumerate(per_class.items()):
    single_class.announce(i, per_class, cls)
    evaluate.evaluate_checkpoint(sub, subdir)
  return single_class.gather(config, workdir, per_class, "eval")


class Trainee(Protocol):
  """What `_train_and_evaluate` trains, opened in a workdir by its constructor (config,
  workdir): its data, model and devices, its initial state (centres still zero), and the parts
  of training that differ between a single run (`SingleRun`) and a population
  (`training.population.Population`)."""

  dataset: Any
  spec: steps.ModelSpec
  devices: sharding.Devices
  state: steps.TrainState
  members: int  # the population's size; 0: a single model (`feature_pass`)
  batching: str  # the form of the feature pass of a population (`feature_pass`)
  meta: dict  # recorded in every checkpoint beside `runs.run_meta`'s fields
  order_seed: int | list[int]  # the data order's (`loop.train_batches`)

  def centres(self, state: steps.TrainState, acc) -> steps.TrainState:
    """The state with the centres and noise scale of the feature pass's sums `acc`."""

  def compile(self, state: steps.TrainState) -> Callable:
    """The training step: (state, batch) -> (state, metrics)."""

  def evaluator(self, state: steps.TrainState) -> Callable[..., list[dict]]:
    """(state, tag, **`evaluate.evaluate`'s keywords) -> the table of every model scored."""

  def hooks(self, steps_per_epoch: int, evaluate_epoch: Callable) -> loop.Hooks:
    """The loop's hooks, with `evaluate_epoch` (state, epoch) for the evaluations between
    epochs."""

  def trained(self, last: dict) -> None:
    """After the last step, with the last training window's metrics."""

  def best_epochs(self, run_id: str) -> list[dict]:
    """The table of every model's best epoch (`evaluate.report_best_epoch`)."""

  def finish(self, tables: list[dict], run_id: str) -> dict:
    """After the final evaluation, its `tables`: -> the run's table."""


def _train_and_evaluate(
    config,
    workdir: str,
    stop: loop.StopRequest,
    allow_config_change: bool,
    trainee: Callable[[ml_collections.ConfigDict, str], Trainee],
) -> dict:
  os.makedirs(workdir, exist_ok=True)
  run = trainee(config, workdir)
  dataset, spec, devices, state = run.dataset, run.spec, run.devices, run.state
  mngr = checkpoint.manager(workdir, config.train.keep_checkpoints)
  meta = {**runs.run_meta(config, dataset.class_names, spec, dataset.identity), **run.meta}
  resumed = runs.resume(mngr, state, meta, workdir, allow_config_change)
  # Result files name the run that wrote them, and say when its test images changed.
  run_info = {
      "run_id": meta["run_id"],
      "data_note": runs.test_data_note(meta["data"], dataset.identity),
  }
  if run_info["data_note"]:
    print(f"note: {run_info['data_note']}", flush=True)

  def features(state):
    return feature_pass(state, spec, devices, dataset, config, workdir, run.members, run.batching)

  if resumed is not None:
    state = resumed
    cache = features(state)[1] if config.train.cache_features else None
  else:
    t0 = time.time()
    acc, cache = features(state)
    state = run.centres(state, acc)
    print(f"feature pass: {time.time() - t0:.1f}s", flush=True)
    checkpoint.save(mngr, 0, state.checkpointable(), meta)
  train_labels = data_lib.class_indices(dataset.train)

  bs = config.train.batch_size
  steps_per_epoch = math.ceil(len(dataset.train) / bs)
  total = config.train.epochs * steps_per_epoch
  train_step = run.compile(state)
  evaluator = run.evaluator(state)
  reader = loader.BatchReader(dataset.train, config.data.workers)
  step = int(state.step[0]) if run.members else int(state.step)
  per_member = len(run.order_seed) if isinstance(run.order_seed, list) else 0
  on_devices = on_device.place(
      config, devices, train_step, state, len(train_labels), cache, reader, per_member
  )
  batches = loop.train_batches(
      step, total, run.order_seed, bs, devices, train_labels, cache, reader, on_devices
  )

  def evaluate_epoch(state, epoch: int) -> None:
    evaluator(state, f"epoch_{epoch:03d}", heatmaps=False, run_info=run_info)

  hooks = run.hooks(steps_per_epoch, evaluate_epoch)
  state, last_metrics = loop.run_steps(
      state, train_step, batches, config, step, steps_per_epoch, mngr, meta, stop, hooks
  )
  reader.close()
  run.trained(last_metrics)
  if config.eval.protocol == "final":
    tables = evaluator(state, "final", with_thresholds=True, run_info=run_info)
  else:
    evaluator(state, f"epoch_{config.train.epochs:03d}", with_thresholds=True, run_info=run_info)
    tables = run.best_epochs(meta["run_id"])
  return run.finish(tables, meta["run_id"])


class SingleRun:
  """One model (`Trainee`): its results in <workdir>/results, its training log in
  <workdir>/train_log.jsonl, its TensorBoard in <workdir>/tensorboard."""

  members = 0
  batching = "auto"

  def __init__(self, config, workdir: str):
    self.config, self.workdir = config, workdir
    self.dataset, self.spec, self.devices, self.state = runs.open_for_training(config, workdir)
    self.meta = {}
    self.order_seed = population_lib.order_seed(config)
    self.board = None  # the run's TensorBoard, from `hooks` to `finish`

  def centres(self, state: steps.TrainState, acc) -> steps.TrainState:
    return compute_centres(state, acc, self.dataset, self.config)

  def compile(self, state: steps.TrainState) -> Callable:
    return self.devices.compile_train(self.spec, deterministic=self.config.train.deterministic)

  def evaluator(self, state: steps.TrainState) -> Callable[..., list[dict]]:
    scorer = scoring.Scorer(self.spec, self.devices, self.config.eval.batch_size)  # compiled once

    def evaluate_run(state, tag: str, **kw) -> list[dict]:
      scorer.set_state(state)
      return [evaluate.evaluate(scorer, self.dataset, self.config, self.workdir, tag, **kw)]

    return evaluate_run

  def hooks(self, steps_per_epoch: int, evaluate_epoch: Callable) -> loop.Hooks:
    hooks, self.board = run_hooks(self.config, self.workdir, steps_per_epoch, evaluate_epoch)
    return hooks

  def trained(self, last: dict) -> None:
    if last:
      print("final training window: " + results.format_train_metrics(last), flush=True)

  def best_epochs(self, run_id: str) -> list[dict]:
    return [evaluate.report_best_epoch(self.workdir, run_id)]

  def finish(self, tables: list[dict], run_id: str) -> dict:
    self.board.close()
    summaries.write_curves(self.workdir, run_id)
    stop_lib.poll("the run's last step", "its checkpoints and results are complete")
    return tables[0]


def run_hooks(config, workdir: str, steps_per_epoch: int, evaluate_epoch: Callable) -> tuple:
  """A single run's hooks: the NaN check, the training log (<workdir>/train_log.jsonl and its
  TensorBoard) and `evaluate_epoch`. -> (loop.Hooks, the TensorBoard writer, which the caller
  closes)."""
  history_path = (
      os.path.join(workdir, "train_log.jsonl") if jax.process_index() == 0 else os.devnull
  )
  board = summaries.for_workdir(workdir, specs.tensorboard(config))
  learning_rates = specs.learning_rates(config)

  def log(window, done: int) -> dict:
    metrics = results.summarise_window(window)
    with open(history_path, "a") as f:
      f.write(json.dumps({"step": done, "epoch": done / steps_per_epoch, **metrics}) + "\n")
    board.train(done, metrics, learning_rates)
    return metrics

  return loop.Hooks(check_finite, log, evaluate_epoch), board
