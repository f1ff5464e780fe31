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
the report read). `Population` holds what differs from a single run for the one training
driver (`train.train_and_evaluate`, which trains a population when `train.population` is set).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cras_jax import backbones
from cras_jax import data as data_lib
from cras_jax.base import csv_cells, errors, fileio, jsonio, progress
from cras_jax.config import check as config_check
from cras_jax.config import population as population_lib
from cras_jax.engine import population as pop
from cras_jax.engine import sharding, steps
from cras_jax.experiments import spread
from cras_jax.method import centres as centres_lib
from cras_jax.method import metrics as metrics_lib
from cras_jax.results import summaries
from cras_jax.results import tables as results
from cras_jax.runs import named_inputs, specs, trained
from cras_jax.runs import workdir as runs
from cras_jax.scoring import evaluate, scoring
from cras_jax.training import loop


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
  devices.check_batch(config.train.batch_size)  # before the data is prepared
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


class Population:
  """The members of `train.population` (`train.Trainee`), trained together: each member's
  results, training log and TensorBoard in <workdir>/results/<member>/, the spread over them
  and their mean in <workdir>/results/ (`write_summary`)."""

  def __init__(self, config, workdir: str):
    self.config, self.workdir = config, workdir
    self.dataset, self.spec, self.devices, self.state, self.member_configs = open_population(
        config, workdir
    )
    self.names = [n for n, _ in self.member_configs]
    self.members = len(self.names)
    self.batching = pop.resolve_batching(
        config.train.population_batching, config.train.population_model_shards
    )
    # One data order, or each member its own single run's (`config.population.data_order`).
    orders = [population_lib.order_seed(cfg) for _, cfg in self.member_configs]
    self.per_member = len(set(orders)) > 1
    self.order_seed = orders if self.per_member else orders[0]
    self.meta = {"population": self.names}
    print(
        f"population: {len(self.names)} members, batching {self.batching!r}, data order "
        + ("per member" if self.per_member else "shared"),
        flush=True,
    )

  def centres(self, state: steps.TrainState, acc) -> steps.TrainState:
    state = compute_centres(state, acc, self.dataset, self.config, self.names)
    return self.devices.put_population(jax.device_get(state))

  def compile(self, state: steps.TrainState) -> Callable:
    return self.devices.population_step(
        self.spec,
        state,
        self.batching,
        deterministic=self.config.train.deterministic,
        per_member=self.per_member,
    )

  def evaluator(self, state: steps.TrainState) -> _Evaluator:
    return _Evaluator(
        self.spec, state, self.config, self.member_configs, self.dataset, self.workdir
    )

  def hooks(self, steps_per_epoch: int, evaluate_epoch: Callable) -> loop.Hooks:
    members, workdir = self.member_configs, self.workdir
    return loop.Hooks(
        check=lambda window, done: check_finite(window, done, self.names),
        log=lambda window, done: _log_window(window, done, steps_per_epoch, members, workdir),
        evaluate=evaluate_epoch,
        on_stop=lambda: _close_boards(members, workdir),
        desc=f"train x{len(self.names)}",
        shown_suffix=" (member mean)",
    )

  def trained(self, last: dict) -> None:
    """Nothing: the members' last windows are in their training logs."""

  def best_epochs(self, run_id: str) -> list[dict]:
    return [
        evaluate.report_best_epoch(
            self.workdir, run_id, results_dir=os.path.join(self.workdir, "results", name)
        )
        for name in self.names
    ]

  def finish(self, tables: list[dict], run_id: str) -> dict:
    _close_boards(self.member_configs, self.workdir)
    sources = population_lib.variance_sources(cfg for _, cfg in self.member_configs)
    return write_summary(tables, self.names, self.workdir, "final", self.config, sources)


def centre_values(acc, n: int, noise_relative: bool):
  """(centres, noise scale, adapted-feature std) from the feature pass's sums over `n` images:
  the arithmetic of a single run, and of each population member on its own scalars
  (element-wise arithmetic run op by op on a vector of members rounds differently on a CPU)."""
  sums, counts, s1, s2 = acc
  mean, meansq = s1 / n, s2 / n
  std = jnp.sqrt(jnp.maximum(meansq - mean**2, 0.0))
  noise_std = std if noise_relative else jnp.ones((), jnp.float32)
  return centres_lib.finalise(sums, counts), noise_std, std


def compute_centres(state, acc, dataset, config, names) -> steps.TrainState:
  """`train.compute_centres` of every member: `centre_values` on each member's own sums and
  scalars, so the centres and the noise scale are its single run's bit for bit."""
  n = len(dataset.train)
  missing = [dataset.class_names[i] for i in np.flatnonzero(np.asarray(acc[1][0]) == 0)]
  if missing:
    raise ValueError(f"no training images for classes {missing}")
  relative = config.model.noise_relative
  values = [centre_values(tuple(x[k] for x in acc), n, relative) for k in range(len(names))]
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

  def __init__(self, spec, state, config, members, dataset, workdir: str):
    self.devices = sharding.Devices()
    self.scorer = scoring.Scorer(spec, self.devices, config.eval.batch_size)
    self.backbone = self.devices.put_replicated(jax.device_get(state.backbone))
    self.members = members
    self.dataset, self.workdir = dataset, workdir

  def __call__(self, state, tag: str, run_info=None, **kw) -> list[dict]:
    dataset, workdir = self.dataset, self.workdir
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
