"""Training a population of heads (`train.population`): one compiled step for every member.

The members (`config.population.member_configs`) share the data and the frozen backbone, and
one data order or each their own (`train.member_data_order`, `config.population.data_order`:
member k then reads its single run's batches, stacked on a member axis); their states are
stacked on a leading axis and trained by the single-run step (`engine.population`, members one
after another or vmapped: `train.population_batching`), on a 2-D mesh ("model", "data"). One
checkpoint holds the whole population and resumes exactly like a single run; the NaN guard
stops at the first member that diverges, naming it. Each member is evaluated like a single run
into `<workdir>/results/<member>/` (metrics, scores, thresholds, train log), and the spread over
the members into `<workdir>/results/population_<tag>.{json,md,csv}` (naming what it spans:
`variance_sources`), their mean into `<workdir>/results/metrics_<tag>.json` (what a sweep and
the report read).
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from cras_jax import backbones
from cras_jax import data as data_lib
from cras_jax.base import csv_cells, errors, fileio, jsonio, progress
from cras_jax.config import check as config_check
from cras_jax.config import population as population_lib
from cras_jax.data import loader
from cras_jax.engine import population as pop
from cras_jax.engine import sharding, steps
from cras_jax.experiments import spread
from cras_jax.method import metrics as metrics_lib
from cras_jax.results import summaries
from cras_jax.results import tables as results
from cras_jax.runs import checkpoint, named_inputs, specs, trained
from cras_jax.runs import workdir as runs
from cras_jax.scoring import evaluate, scoring
from cras_jax.training import loop, train


def train_and_evaluate(config, workdir: str, allow_config_change: bool = False) -> dict:
  """Trains the population of `config` in `workdir` (resuming) and evaluates every member.
  -> the mean over the members of their final per-class tables."""
  progress.configure(config)
  config_check.check(config)
  named_inputs.ensure(config)  # weights and data named by the config: fetched once
  os.makedirs(workdir, exist_ok=True)
  with runs.WorkdirLock(workdir), loop.StopRequest("this step or batch") as stop:
    return _train_and_evaluate(config, workdir, stop, allow_config_change)


def open_population(config, workdir: str):
  """-> (dataset, spec, devices, stacked initial state, [(member name, member config)])."""
  members = population_lib.member_configs(config)
  shards = config.train.population_model_shards
  if len(members) % shards:
    raise errors.UserValueError(
        f"train.population_model_shards={shards}: must divide the population's "
        f"{len(members)} members"
    )
  try:
    devices = pop.PopulationDevices(shards)
  except ValueError as e:
    raise errors.UserValueError(str(e)) from None
  dataset = data_lib.load(specs.data_spec(config), workdir)
  spec = steps.ModelSpec(config, len(dataset.class_names))
  backbone = backbones.load_variables(
      config.model.backbone,
      config.model.weights,
      config.data.crop,
      population_lib.backbone_seed(config),
  )
  states = [
      steps.create_state(spec, backbone, cfg.seed).replace(hparams=steps.hparams_from_config(cfg))
      for _, cfg in members
  ]
  state = devices.put_population(jax.device_get(pop.stack(states)))
  return dataset, spec, devices, state, members


def compute_centres(state, acc, dataset, config, names) -> steps.TrainState:
  """`train.compute_centres` of every member: `train.centre_values` on each member's own
  sums and scalars, so the centres and the noise scale are its single run's bit for bit."""
  n = len(dataset.train)
  missing = [dataset.class_names[i] for i in np.flatnonzero(np.asarray(acc[1][0]) == 0)]
  if missing:
    raise ValueError(f"no training images for classes {missing}")
  relative = config.model.noise_relative
  values = [train.centre_values(tuple(x[k] for x in acc), n, relative) for k in range(len(names))]
  centres, noise_std, std = (jnp.stack(v) for v in zip(*values))
  sigma = np.asarray(state.hparams["noise_sigma"]) * np.asarray(noise_std)
  print(
      f"centres: {len(names)} members, adapted-feature std "
      + ", ".join(f"{m} {float(s):.4f}" for m, s in zip(names, np.asarray(std)))
      + "; noise sigma "
      + ", ".join(f"{float(s):.4f}" for s in sigma),
      flush=True,
  )
  return state.replace(centres=centres, noise_std=noise_std)


def check_finite(window, done: int, names) -> None:
  """`train.check_finite` per member: the first non-finite loss or gradient norm stops the
  population, naming the member."""
  host = jax.device_get([m for m, _, _ in window])
  first = done - len(window) + 1
  for i, m in enumerate(host):
    for k, name in enumerate(names):
      bad = [key for key in ("loss", "grad_norm") if not np.isfinite(m[key][k])]
      if bad:
        raise FloatingPointError(
            f"member {name}: non-finite {' and '.join(bad)} at step {first + i}: the "
            f"population stopped; the last checkpoint (before that step) is kept. Lower that "
            f"member's learning rates or drop it from train.population."
        )


def _log_window(window, done: int, steps_per_epoch: int, members, workdir: str) -> dict:
  """Per-member window summaries appended to results/<member>/train_log.jsonl and to the
  member's TensorBoard (results/<member>/tensorboard/); -> the mean."""
  per = {}
  for k, (name, cfg) in enumerate(members):
    member_window = [(jax.tree.map(lambda x, k=k: x[k], m), b, t) for m, b, t in window]
    per[name] = results.summarise_window(member_window)
    if jax.process_index() == 0:
      d = os.path.join(workdir, "results", name)
      os.makedirs(d, exist_ok=True)
      with open(os.path.join(d, "train_log.jsonl"), "a") as f:
        f.write(json.dumps({"step": done, "epoch": done / steps_per_epoch, **per[name]}) + "\n")
      board = summaries.for_workdir(d, specs.tensorboard(cfg))
      board.train(done, per[name], specs.learning_rates(cfg))
  first = per[members[0][0]]
  return {k: float(np.mean([p[k] for p in per.values()])) for k in first}


def _close_boards(members, workdir: str) -> None:
  for name, cfg in members:
    summaries.for_workdir(os.path.join(workdir, "results", name), specs.tensorboard(cfg)).close()


class _Evaluator:
  """Scores member k of a stacked state like a single run, into results/<member>/."""

  def __init__(self, spec, state, config, members):
    self.devices = sharding.Devices()
    self.scorer = scoring.Scorer(spec, self.devices, config.eval.batch_size)
    self.backbone = self.devices.put_replicated(jax.device_get(state.backbone))
    self.members = members

  def __call__(self, state, dataset, workdir: str, tag: str, run_info=None, **kw) -> list[dict]:
    tables = []
    for k, (name, cfg) in enumerate(self.members):
      info = {**(run_info or {}), "member": name}  # its thresholds name it
      heads = jax.device_get(jax.tree.map(lambda x, k=k: x[k], state.replace(backbone=None)))
      member = self.devices.put_replicated(heads).replace(backbone=self.backbone)
      out = os.path.join(workdir, "results", name)
      tables.append(
          evaluate.evaluate(
              self.scorer.set_state(member),
              dataset,
              cfg,
              workdir,
              tag,
              results_dir=out,
              run_info=info,
              **kw,
          )
      )
      if jax.process_index() == 0:
        fileio.atomic_write_json(
            os.path.join(out, "member.json"),
            {"name": name, "config": json.loads(cfg.to_json_best_effort())},
        )
    return tables


def evaluate_checkpoint(config, workdir: str) -> dict:
  """`--mode=eval` of a population: every member of the workdir's latest checkpoint scored
  as a single run's `--mode=eval` scores, into results/<member>/ (tag "eval"); the spread
  over the members into results/population_eval.{json,md,csv}, their mean into
  results/metrics_eval.json. -> the mean table."""
  config_check.check(config)
  progress.configure(config)
  named_inputs.ensure(config)  # weights and data named by the config: fetched once
  members = trained.load_members(workdir, config)
  dataset = trained.load_run_dataset(members[0], workdir)
  note = runs.test_data_note(members[0].meta.get("data"), dataset.identity)
  if note:
    print(f"note: {note}", flush=True)
  info = {"run_id": members[0].meta.get("run_id"), "data_note": note}
  scorer = scoring.Scorer.for_run(members[0])  # one compiled step: the members share shapes
  tables = []
  for run in members:
    print(f"member {run.member}", flush=True)
    cfg = run.config
    out = trained.results_dir(run, workdir)
    tables.append(
        evaluate.evaluate(
            scorer.set_state(run.state),
            dataset,
            cfg,
            workdir,
            "eval",
            results_dir=out,
            run_info={**info, "member": run.member},
        )
    )
  _close_boards([(r.member, r.config) for r in members], workdir)
  sources = population_lib.variance_sources(r.config for r in members)
  return write_summary(tables, [r.member for r in members], workdir, "eval", config, sources)


def write_summary(tables, names, workdir: str, tag: str, config, sources: str) -> dict:
  """results/population_<tag>.{json,md,csv}: mean ± std and 95 % intervals over the members,
  and what they span (`sources`: `config.population.variance_sources`, e.g. "initialisation +
  noise + data order"). -> the mean table."""
  metrics = list(metrics_lib.METRIC_KEYS)
  sp = spread.spread(tables, metrics)
  out = os.path.join(workdir, "results")
  text = spread.markdown(sp, metrics, metrics_lib.METRIC_NAMES, len(tables), sources)
  text = f"Population {config.train.population!r}: {', '.join(names)}\n\n" + text
  if jax.process_index() == 0:
    base = os.path.join(out, f"{population_lib.SUMMARY}_{tag}")
    record = {
        "population": config.train.population,
        "members": names,
        "variance_sources": sources,
        "spread": sp,
    }
    fileio.atomic_write_json(base + ".json", jsonio.json_safe(record), allow_nan=False)
    fileio.atomic_write_text(base + ".md", text)
    with fileio.atomic_write(base + ".csv", "w", newline="") as f:
      w = csv_cells.writer(f)
      w.writerow(["class", "metric", "mean", "std", "lo95", "hi95", "n", "variance_sources"])
      w.writerows([*row, sources] for row in spread.rows(sp, metrics))
  print("\n" + text, flush=True)
  table = {c: {m: row[m]["mean"] for m in metrics} for c, row in sp.items()}
  first = _read_json(os.path.join(out, names[0], f"metrics_{tag}.json"))
  extra = {k: first[k] for k in ("step", "protocol", "score_mode", "matching") if k in first}
  extra.update(population=config.train.population, members=names, variance_sources=sources)
  extra["protocol"] = extra.get("protocol", "final epoch")
  if jax.process_index() == 0:  # the sweep's and the report's view: the mean over the members
    results.write_results(table, out, tag, extra)
  return table


def _read_json(path) -> dict:
  with open(path) as f:
    return json.load(f)


def _train_and_evaluate(config, workdir: str, stop, allow_config_change: bool) -> dict:
  dataset, spec, devices, state, members = open_population(config, workdir)
  names = [n for n, _ in members]
  batching = pop.resolve_batching(
      config.train.population_batching, config.train.population_model_shards
  )
  # One data order, or each member its own single run's (`config.population.data_order`).
  orders = [population_lib.order_seed(cfg) for _, cfg in members]
  per_member = len(set(orders)) > 1
  print(
      f"population: {len(names)} members, batching {batching!r}, data order "
      + ("per member" if per_member else "shared"),
      flush=True,
  )
  mngr = checkpoint.manager(workdir, config.train.keep_checkpoints)
  meta = {
      **runs.run_meta(config, dataset.class_names, spec, dataset.identity),
      "population": names,
  }
  resumed = runs.resume(mngr, state, meta, workdir, allow_config_change)
  info = {  # result files name the run and say when its test images changed
      "run_id": meta["run_id"],
      "data_note": runs.test_data_note(meta["data"], dataset.identity),
  }
  if info["data_note"]:
    print(f"note: {info['data_note']}", flush=True)
  if resumed is not None:
    state = resumed
    cache = None
    if config.train.cache_features:
      cache = train.feature_pass(
          state, spec, devices, dataset, config, workdir, len(names), batching
      )[1]
  else:
    t0 = time.time()
    acc, cache = train.feature_pass(
        state, spec, devices, dataset, config, workdir, len(names), batching
    )
    state = compute_centres(state, acc, dataset, config, names)
    state = devices.put_population(jax.device_get(state))
    print(f"feature pass: {time.time() - t0:.1f}s", flush=True)
    checkpoint.save(mngr, 0, state.checkpointable(), meta)
  train_labels = data_lib.class_indices(dataset.train)
  bs = config.train.batch_size
  steps_per_epoch = math.ceil(len(dataset.train) / bs)
  total = config.train.epochs * steps_per_epoch
  train_step = devices.population_step(
      spec,
      state,
      batching,
      deterministic=config.train.get("deterministic", True),
      per_member=per_member,
  )
  evaluator = _Evaluator(spec, state, config, members)
  protocol = config.eval.protocol
  reader = loader.BatchReader(dataset.train, config.data.get("workers", 0))
  step = int(state.step[0])
  seed = orders if per_member else orders[0]
  batches = loop.train_batches(step, total, seed, bs, devices, train_labels, cache, reader)

  def evaluate_epoch(state, epoch: int) -> None:
    evaluator(state, dataset, workdir, f"epoch_{epoch:03d}", heatmaps=False, run_info=info)

  hooks = loop.Hooks(
      check=lambda window, done: check_finite(window, done, names),
      log=lambda window, done: _log_window(window, done, steps_per_epoch, members, workdir),
      evaluate=evaluate_epoch,
      on_stop=lambda: _close_boards(members, workdir),
      desc=f"train x{len(names)}",
      shown_suffix=" (member mean)",
  )
  state, _ = loop.run_steps(
      state, train_step, batches, config, step, steps_per_epoch, mngr, meta, stop, hooks
  )
  reader.close()
  if protocol == "final":
    tables = evaluator(state, dataset, workdir, "final", with_thresholds=True, run_info=info)
  else:
    evaluator(
        state,
        dataset,
        workdir,
        f"epoch_{config.train.epochs:03d}",
        with_thresholds=True,
        run_info=info,
    )
    tables = [
        evaluate.report_best_epoch(
            workdir, meta["run_id"], results_dir=os.path.join(workdir, "results", name)
        )
        for name in names
    ]
  _close_boards(members, workdir)
  sources = population_lib.variance_sources(cfg for _, cfg in members)
  return write_summary(tables, names, workdir, "final", config, sources)
