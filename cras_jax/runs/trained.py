"""A trained run, read-only: `load_run` restores a workdir's newest readable checkpoint
(a population's member by name, `load_members` all of them) with nothing in the workdir created,
changed or locked; `load_run_dataset` gives the test data the run was trained on; `run_home`
and `results_dir` say where a run's thresholds and results live.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

import jax
import ml_collections

from cras_jax import data as data_lib
from cras_jax.base import errors
from cras_jax.config import check as config_check
from cras_jax.config import population
from cras_jax.engine import population as population_engine
from cras_jax.engine import sharding, steps
from cras_jax.runs import checkpoint, specs
from cras_jax.runs.workdir import (
    TRAINING_ONLY_FIELDS,
    config_differences,
    config_from_meta,
    initial,
    restore_latest,
)


class Run(NamedTuple):
  """A trained run restored from its workdir, ready to score."""

  config: ml_collections.ConfigDict
  spec: steps.ModelSpec
  devices: sharding.Devices
  state: steps.TrainState
  meta: dict
  member: str | None = None  # a population's member (`config` is then the member's own)

  @property
  def class_names(self) -> list[str]:
    return list(self.meta["class_names"])


def run_home(run: Run, workdir: str) -> str:
  """Where a run's thresholds.json lives: its workdir, or a population member's
  results/<member>/ (as training writes them)."""
  return os.path.join(workdir, "results", run.member) if run.member else workdir


def results_dir(run: Run, workdir: str) -> str:
  """A run's results folder: <workdir>/results, or a population member's
  <workdir>/results/<member>."""
  return os.path.join(workdir, "results", *([run.member] if run.member else []))


def check_eval_config(saved_meta: dict, config, workdir: str) -> None:
  """`--mode=eval` with a config: refused where it differs from the run's saved config in a
  field that changes how the checkpoint scores (preprocessing, model, scoring); fields that
  only change reporting or training may differ."""
  current = json.loads(config.to_json_best_effort())
  diffs = config_differences(saved_meta["config"], current, TRAINING_ONLY_FIELDS)
  if diffs:
    raise errors.UserValueError(
        f"{workdir} was trained with a different configuration than the one given:\n  "
        + "\n  ".join(diffs)
        + "\nEvaluate with the run's own settings (drop these overrides), or train a new "
        "run with them in a new --workdir."
    )


def load_run(
    workdir: str, config: ml_collections.ConfigDict | None = None, member: str | None = None
) -> Run:
  """Restores the workdir's newest readable checkpoint with its frozen backbone, read-only:
  nothing in the workdir is created, changed or locked (a training may be saving into it).

  config: defaults to the one the run was trained with (from the checkpoint), so a
  trained workdir alone is enough to score new images; a given one must agree with it in
  the fields that change scoring (`check_eval_config`).
  member: the member to restore of a population's workdir (required there, refused
  elsewhere); the Run then carries the member's own config.
  """
  mngr, meta, config = _open_checkpoint(workdir, config)
  names = meta.get("population")
  if names or member:
    k = _member_index(workdir, meta, member)
    return load_population(workdir, config, mngr, meta)[k]
  spec, devices, state = initial(config, len(meta["class_names"]), meta.get("grid"))
  state, meta = restore_latest(mngr, state, quarantine=False)
  return Run(config, spec, devices, state, meta)


def _open_checkpoint(workdir: str, config):
  """(read-only manager, meta, config) of a trained workdir, checked (`load_run`)."""
  classes_dir = os.path.join(workdir, "classes")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if os.path.isdir(classes_dir) and not os.path.isdir(ckpt_dir):
    raise errors.UserFileNotFoundError(
        f"{workdir} holds one model per class (setting=single_class): pass one of them, "
        f"--workdir={os.path.join(classes_dir, '<class>')} "
        f"({', '.join(sorted(os.listdir(classes_dir)))})"
    )
  no_checkpoint = errors.UserFileNotFoundError(
      f"{workdir}: no checkpoint to evaluate; train first "
      f"(python -m cras_jax.main --config=... --workdir={workdir})"
  )
  if not os.path.isdir(ckpt_dir):
    raise no_checkpoint
  mngr = checkpoint.manager(workdir, read_only=True)
  if mngr.latest_step() is None:
    raise no_checkpoint
  meta = checkpoint.restore_meta(mngr)
  if meta is None:
    raise errors.UserValueError(
        f"{ckpt_dir}: no checkpoint with a readable meta item; the run cannot be read"
    )
  bad = [why for why in map(config_check.plain_name_problem, meta["class_names"]) if why]
  if bad:
    raise errors.UserValueError(f"{ckpt_dir}: the run's class names are unusable: {bad[0]}")
  # Member names become folder names (results/<member>/): plain names only.
  bad = [why for why in map(config_check.plain_name_problem, meta.get("population") or []) if why]
  if bad:
    raise errors.UserValueError(f"{ckpt_dir}: the run's member names are unusable: {bad[0]}")
  if config is None:
    config = config_from_meta(meta)
  else:
    check_eval_config(meta, config, workdir)
  return mngr, meta, config


def load_members(workdir: str, config: ml_collections.ConfigDict | None = None) -> list[Run]:
  """Every member of a population's workdir, read-only like `load_run`."""
  mngr, meta, config = _open_checkpoint(workdir, config)
  if not meta.get("population"):
    raise errors.UserValueError(
        f"{workdir} holds one model, not a population: drop --config.train.population"
    )
  return load_population(workdir, config, mngr, meta)


def _member_index(workdir: str, meta: dict, member: str | None) -> int:
  names = meta.get("population")
  if not names:
    raise errors.UserValueError(
        f"--member={member}: {workdir} holds one model, not a population; drop --member"
    )
  if member not in names:
    choose = "choose one" if member is None else f"--member={member} is not one of them; choose"
    text = config_from_meta(meta).train.population
    raise errors.UserValueError(
        f"{workdir} holds a population of {len(names)} models ({', '.join(names)}): {choose} "
        f"with --member=<name> (predict, export, robustness, figures); python -m "
        f"cras_jax.main --mode=eval --config.train.population={text!r} scores them all"
    )
  return list(names).index(member)


def load_population(workdir: str, config, mngr, meta: dict) -> list[Run]:
  """Every member of a population's newest readable checkpoint (one restore), each a Run
  with its own config; `config` is the population's."""
  members = population.member_configs(config)
  names = [n for n, _ in members]
  if names != list(meta["population"]):
    raise errors.UserValueError(
        f"{workdir} holds the members {', '.join(meta['population'])}; the config's "
        f"train.population={config.train.population!r} names {', '.join(names)}: evaluate "
        f"with the run's own train.population"
    )
  spec, devices, first = initial(members[0][1], len(meta["class_names"]), meta.get("grid"))
  backbone = first.backbone
  states = [first] + [
      steps.create_state(spec, backbone, cfg.seed).replace(hparams=steps.hparams_from_config(cfg))
      for _, cfg in members[1:]
  ]
  stacked = population_engine.stack([jax.device_get(s.replace(backbone=None)) for s in states])
  stacked, meta = restore_latest(mngr, stacked, quarantine=False)
  out = []
  for k, (name, cfg) in enumerate(members):
    heads = jax.device_get(population_engine.member(stacked, k).replace(backbone=None))
    state = devices.put_replicated(heads).replace(backbone=backbone)
    out.append(Run(cfg, spec, devices, state, meta, name))
  return out


def load_run_dataset(run: Run, workdir: str, data_root: str | None = None):
  """The dataset of a loaded run (its config's data, or `data_root` instead of the
  recorded root), checked to hold the classes the run was trained on."""
  config = run.config
  if data_root:
    config = ml_collections.ConfigDict(config.to_dict())
    config.data.root = data_root
  dataset = data_lib.load(specs.data_spec(config), workdir)
  if run.class_names != list(dataset.class_names):
    raise errors.UserValueError(
        f"checkpoint classes {run.class_names} differ from the data's "
        f"{list(dataset.class_names)}"
    )
  return dataset
