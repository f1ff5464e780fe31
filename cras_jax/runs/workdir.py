"""A run in its workdir: opening it for training or read-only for scoring, its checkpoints.

A workdir holds one run: its orbax checkpoints (state and `run_meta`: classes, config,
versions), results and lock. `open_for_training` builds the initial state of a config and
`resume` continues from the latest checkpoint (refusing a changed result-changing config);
`load_run` restores a trained run read-only, from its checkpoint alone, and
`load_run_dataset` the test data it was trained on.
"""

from __future__ import annotations

import fcntl
import json
import os
from typing import NamedTuple

import jax
import ml_collections

import cras_jax
from cras_jax import backbones
from cras_jax.runs import checkpoint, config_check, population, results, specs
from cras_jax.base import errors, user_cache
from cras_jax.engine import sharding, steps
from cras_jax import data as data_lib

# Config fields that change the shapes of the saved state: a run cannot continue with other
# values, even with --allow_config_change.
SHAPE_FIELDS = (
    "model.backbone",
    "model.levels",
    "model.patch_size",
    "model.pre_embed_dim",
    "model.embed_dim",
    "model.adapter_layers",
    "model.disc_layers",
    "model.crd_input",
    "data.crop",
)
# Fields that do not change how a trained checkpoint scores: `--mode=eval` may differ in
# them (and in NON_RESULT_FIELDS) from the run's saved config.
TRAINING_ONLY_FIELDS = ("train.",)

# Config fields that do not change results: they may differ between a run and its resumption.
NON_RESULT_FIELDS = (
    "data.root",
    "data.cache_dir",
    "data.data_dir",
    "data.download_url",
    "data.download_sha256",
    "model.weights_url",
    "cache.",
    "train.log_every",
    "train.eval_every",
    "train.checkpoint_every_steps",
    "train.keep_checkpoints",
    "train.cache_features",
    "train.feature_cache_dir",
    "train.population_model_shards",
    "data.max_image_pixels",
    "data.max_aspect_ratio",
    "eval.",
    "log.",
)


class Run(NamedTuple):
  """A trained run restored from its workdir, ready to score."""

  config: ml_collections.ConfigDict
  spec: steps.ModelSpec
  devices: sharding.Devices
  state: steps.TrainState
  meta: dict

  @property
  def class_names(self) -> list[str]:
    return list(self.meta["class_names"])


def run_meta(config, class_names, spec: steps.ModelSpec) -> dict:
  """The record every checkpoint of a run holds beside its state."""
  return {
      "class_names": list(class_names),
      "config": json.loads(config.to_json_best_effort()),
      "grid": list(spec.grid),
      "num_patches": spec.num_patches,
      "versions": results.versions(),
      "cras_jax": cras_jax.__version__,
  }


def config_from_meta(meta: dict) -> ml_collections.ConfigDict:
  """The config a checkpoint was trained with (stored in its meta item)."""
  return ml_collections.ConfigDict(meta["config"])


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = list(v) if isinstance(v, tuple) else v
  return out


def _matches(key: str, fields) -> bool:
  return any(key == f or (f.endswith(".") and key.startswith(f)) for f in fields)


def config_differences(saved: dict, current: dict, ignore: tuple[str, ...] = ()) -> list[str]:
  """Result-changing fields that differ between a saved and a new config (fields added
  later count as their default where a config lacks them)."""
  a, b = _flatten(saved), _flatten(current)
  for d in (a, b):
    for key, value in config_check.LATER_DEFAULTS.items():
      d.setdefault(key, value)
  diffs = []
  for key in sorted(a.keys() | b.keys()):
    if _matches(key, NON_RESULT_FIELDS + tuple(ignore)):
      continue
    if a.get(key, "<absent>") != b.get(key, "<absent>"):
      diffs.append(f"{key}: saved {a.get(key, '<absent>')!r}, now {b.get(key, '<absent>')!r}")
  return diffs


class WorkdirLock:
  """An exclusive lock on the workdir (flock: released by the OS even on SIGKILL).

  In a multi-process run each process locks its own file (process 0 the same
  file as a single-process run), so the processes of one job share the workdir
  while a second job on it is refused.
  """

  def __init__(self, workdir: str):
    i = jax.process_index()
    self.path = os.path.join(workdir, ".lock" if i == 0 else f".lock.process{i}")
    self._f = None

  def __enter__(self):
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    self._f = open(self.path, "a+")
    try:
      fcntl.flock(self._f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self._f.seek(0)
      owner = self._f.read().strip() or "another process"
      self._f.close()
      raise errors.UserError(
          f"{os.path.dirname(self.path)} is in use by a running job ({owner}); "
          f"wait for it to finish or use another --workdir"
      ) from None
    self._f.seek(0)
    self._f.truncate()
    self._f.write(f"pid {os.getpid()}\n")
    self._f.flush()
    return self

  def __exit__(self, *exc):
    fcntl.flock(self._f, fcntl.LOCK_UN)
    self._f.close()
    return False


def _initial(
    config, num_classes: int, grid=None
) -> tuple[steps.ModelSpec, sharding.Devices, steps.TrainState]:
  """The model spec, the devices and a fresh replicated state with the frozen backbone
  (`grid`: the patch grid a run's meta records, sparing a trace of the backbone)."""
  spec = steps.ModelSpec(config, num_classes, grid)
  devices = sharding.Devices()
  backbone_vars = backbones.load_variables(
      config.model.backbone,
      config.model.weights,
      config.data.crop,
      population.data_seed(config),
      cache_dir=user_cache.root(config),
      weights_url=config.model.get("weights_url", ""),
  )
  state = steps.create_state(spec, backbone_vars, config.seed)
  return spec, devices, devices.put_replicated(jax.device_get(state))


def open_for_training(config, workdir: str):
  """-> (dataset, spec, devices, initial state) of a config: the data prepared (in the
  workdir's cache), the heads initialised, the centres still zero."""
  dataset = data_lib.load(specs.data_spec(config), workdir)
  return (dataset, *_initial(config, len(dataset.class_names)))


def restore_latest(mngr, state: steps.TrainState, quarantine: bool = True):
  """The newest readable checkpoint; corrupted newer ones are reported and skipped (and with
  `quarantine`, for training only, moved to corrupted_checkpoints/)."""
  tree, meta, step, skipped = checkpoint.restore_good(mngr, state.checkpointable(), quarantine)
  for bad, reason in skipped:
    print(
        f"checkpoint {bad} is unreadable ({reason}); falling back to an earlier one"
        + (" (moved to corrupted_checkpoints/)" if quarantine else ""),
        flush=True,
    )
  if skipped:
    print(f"using checkpoint {step}", flush=True)
  return state.replace(**tree), meta


def resume(
    mngr, state: steps.TrainState, meta: dict, workdir: str, allow_config_change: bool = False
) -> steps.TrainState | None:
  """The state of the workdir's latest readable checkpoint, or None when it has none.

  A checkpoint saved with different result-changing config fields is refused unless
  `allow_config_change`; one of other classes is refused always."""
  if mngr.latest_step() is None:
    return None
  saved_meta = checkpoint.restore_meta(mngr)
  if saved_meta is None:
    raise errors.UserValueError(
        f"{mngr.directory}: no checkpoint with a readable meta item; use a new --workdir"
    )
  diffs = config_differences(saved_meta["config"], meta["config"])
  shape_diffs = [d for d in diffs if _matches(d.split(":")[0], SHAPE_FIELDS)]
  if shape_diffs and allow_config_change:
    raise errors.UserValueError(
        f"{workdir} holds a run whose parameter shapes differ from this config's:\n  "
        + "\n  ".join(shape_diffs)
        + "\nthese fields change the shapes of the saved state, so the run cannot continue "
        "with them (not even with --allow_config_change): use a new --workdir."
    )
  if diffs and not allow_config_change:
    raise errors.UserValueError(
        f"{workdir} holds a run with a different configuration:\n  "
        + "\n  ".join(diffs)
        + "\nUse a new --workdir, or pass "
        "--allow_config_change to continue this run with the new values."
    )
  if diffs:
    print(
        "continuing with changed configuration (--allow_config_change):\n  " + "\n  ".join(diffs),
        flush=True,
    )
  state, saved_meta = restore_latest(mngr, state)
  if saved_meta["class_names"] != meta["class_names"]:
    raise errors.UserValueError(
        f"{workdir}: checkpoint classes {saved_meta['class_names']} differ from the "
        f"data's {meta['class_names']}; use a new --workdir"
    )
  print(f"resumed from step {int(state.step.max())} ({mngr.directory})", flush=True)
  return state


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


def load_run(workdir: str, config: ml_collections.ConfigDict | None = None) -> Run:
  """Restores the workdir's newest readable checkpoint with its frozen backbone, read-only:
  nothing in the workdir is created, changed or locked (a training may be saving into it).

  config: defaults to the one the run was trained with (from the checkpoint), so a
  trained workdir alone is enough to score new images; a given one must agree with it in
  the fields that change scoring (`check_eval_config`).
  """
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
  if config is None:
    config = config_from_meta(meta)
  else:
    check_eval_config(meta, config, workdir)
  spec, devices, state = _initial(config, len(meta["class_names"]), meta.get("grid"))
  state, meta = restore_latest(mngr, state, quarantine=False)
  return Run(config, spec, devices, state, meta)


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
