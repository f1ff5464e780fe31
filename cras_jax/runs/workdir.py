"""A run in its workdir for training: its checkpoints, config checks and lock.

A workdir holds one run: its orbax checkpoints (state and `run_meta`: classes, config,
versions), results and lock. `open_for_training` builds the initial state of a config and
`resume` continues from the latest checkpoint (refusing a changed result-changing config).
Reading a trained run, for scoring, is `runs.trained`.
"""

from __future__ import annotations

import fcntl
import json
import os
import uuid

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

import cras_jax
from cras_jax import backbones
from cras_jax import data as data_lib
from cras_jax.base import errors, schema, user_cache
from cras_jax.config import population
from cras_jax.data import identity
from cras_jax.engine import sharding, steps
from cras_jax.results import tables as results
from cras_jax.runs import checkpoint, specs

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
    "train.population",  # a population's members are stacked on the state's leading axis
)
# Config fields whose values the saved state was computed from, once, at the run's start: the
# class centres and the feature noise scale come from the feature pass over the training data
# (backbone weights, preprocessing, compute dtype, `model.centre`, `model.noise_relative`) and
# the initial heads and random stream from the seed. A checkpoint cannot reflect another value,
# so --allow_config_change refuses them (a run with other values is a new run).
STATE_FIELDS = (
    "seed",
    "data.name",
    "data.classes",
    "data.resize",
    "data.allow_crop_padding",
    "data.synthetic.",
    "model.weights",
    "model.dtype",
    "model.centre",
    "model.noise_relative",
)
# Fields that do not change how a trained checkpoint scores: `--mode=eval` may differ in
# them (and in NON_RESULT_FIELDS) from the run's saved config.
TRAINING_ONLY_FIELDS = ("train.",)

# Config fields that do not change results: they may differ between a run and its resumption.
NON_RESULT_FIELDS = (
    "data.root",
    "data.sources",  # names and roots: the class list and the data's contents are checked
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
    "train.population_batching",
    "train.parallelism",
    "data.max_image_pixels",
    "data.max_aspect_ratio",
    "data.workers",  # the batches do not depend on the reader's threads
    "data.on_device",  # nor on where they are gathered (engine/resident.py)
    "eval.",
    "log.",
)


def new_run_id() -> str:
  """A fresh run id (16 hex digits); in a multi-process run every process gets process 0's."""
  raw = np.frombuffer(uuid.uuid4().bytes[:8], np.uint8)
  if jax.process_count() > 1:
    raw = np.asarray(multihost_utils.broadcast_one_to_all(raw), np.uint8)
  return raw.tobytes().hex()


def run_meta(config, class_names, spec: steps.ModelSpec, data: dict | None = None) -> dict:
  """The record every checkpoint of a run holds beside its state: its id (`run_id`, kept
  when the run resumes, in every result file it writes), classes, data identity
  (`data.identity.of_records`), config and versions."""
  return {
      "run_id": new_run_id(),
      "data": data,
      "class_names": list(class_names),
      "config": json.loads(config.to_json_best_effort()),
      "grid": list(spec.grid),
      "num_patches": spec.num_patches,
      "versions": results.versions(),
      "cras_jax": cras_jax.__version__,
  }


def config_from_meta(meta: dict) -> ml_collections.ConfigDict:
  """The config a checkpoint was trained with (stored in its meta item), with the fields its
  release did not have filled (`schema.filled`: what that release did without them)."""
  return schema.filled(meta["config"])


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
  """Result-changing fields that differ between a saved and a new config (each `schema.filled`:
  a field a config lacks counts as what its release did without it)."""
  a, b = {}, {}
  for d, config in ((a, saved), (b, current)):
    full = schema.filled(config)
    d.update(_flatten(full.to_dict()))
    # "auto" resolved (it follows train.cache_features, a field that changes nothing else).
    d["train.member_data_order"] = population.effective_data_order(full)
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


def initial(
    config, num_classes: int, grid=None
) -> tuple[steps.ModelSpec, sharding.Devices, steps.TrainState]:
  """The model spec, the devices and a fresh replicated state with the frozen backbone
  (`grid`: the patch grid a run's meta records, sparing a trace of the backbone)."""
  spec = steps.ModelSpec(config, num_classes, grid)
  devices = sharding.Devices(parallelism=config.train.parallelism)
  backbone_vars = backbones.load_variables(
      config.model.backbone,
      config.model.weights,
      config.data.crop,
      population.backbone_seed(config),
      cache_dir=user_cache.root(config),
      weights_url=config.model.weights_url,
  )
  state = steps.create_state(spec, backbone_vars, config.seed)
  return spec, devices, devices.put_replicated(jax.device_get(state))


def open_for_training(config, workdir: str):
  """-> (dataset, spec, devices, initial state) of a config: the data prepared (in the
  workdir's cache), the heads initialised, the centres still zero."""
  problem = sharding.batch_problem(config.train.batch_size, jax.device_count())
  if problem:  # before the data is prepared
    raise errors.UserValueError(problem)
  dataset = data_lib.load(specs.data_spec(config), workdir)
  return (dataset, *initial(config, len(dataset.class_names)))


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

  Refused always: a checkpoint of another class list or other training images
  (`check_same_data`), or one whose saved state was computed from other values of
  `SHAPE_FIELDS` or `STATE_FIELDS`; other result-changing config fields unless
  `allow_config_change`. `meta` takes the run's id (and its recorded data) from the
  checkpoint: a resumed run stays the same run."""
  if mngr.latest_step() is None:
    return None
  saved_meta = checkpoint.restore_meta(mngr)
  if saved_meta is None:
    raise errors.UserValueError(
        f"{mngr.directory}: no checkpoint with a readable meta item; use a new --workdir"
    )
  check_same_data(saved_meta, meta, workdir)
  diffs = config_differences(saved_meta["config"], meta["config"])
  shape_diffs = [d for d in diffs if _matches(d.split(":")[0], SHAPE_FIELDS)]
  if shape_diffs and allow_config_change:
    raise errors.UserValueError(
        f"{workdir} holds a run whose parameter shapes differ from this config's:\n  "
        + "\n  ".join(shape_diffs)
        + "\nthese fields change the shapes of the saved state, so the run cannot continue "
        "with them (not even with --allow_config_change): use a new --workdir."
    )
  state_diffs = [d for d in diffs if _matches(d.split(":")[0], STATE_FIELDS)]
  if state_diffs and allow_config_change:
    raise errors.UserValueError(
        f"{workdir} holds a run whose saved state was computed from other values of:\n  "
        + "\n  ".join(state_diffs)
        + "\nthe class centres, the feature noise scale and the initial heads were computed "
        "from these fields at the run's start and the checkpoint cannot reflect a change, so "
        "--allow_config_change does not apply to them: use a new --workdir."
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
  check_same_data(saved_meta, meta, workdir)  # the step restored may be an older one
  meta["run_id"] = saved_meta.get("run_id") or meta["run_id"]
  meta["data"] = saved_meta.get("data") or meta.get("data")
  print(f"resumed from step {int(state.step.max())} ({mngr.directory})", flush=True)
  return state


def check_same_data(saved_meta: dict, meta: dict, workdir: str) -> None:
  """Refuses to continue a run on another class list or other training images (the class
  centres and the heads belong to the run's data), naming what changed."""
  saved, now = list(saved_meta["class_names"]), list(meta["class_names"])
  if saved != now:
    added = [c for c in now if c not in saved]
    gone = [c for c in saved if c not in now]
    change = "; ".join(
        ([f"added {', '.join(added)}"] if added else [])
        + ([f"removed {', '.join(gone)}"] if gone else [])
        or ["the same classes in another order"]
    )
    raise errors.UserValueError(
        f"the class list changed: {workdir} holds a run trained on classes {saved}, the data "
        f"now has {now} ({change}). A run's centres and heads are sized and trained for its "
        f"classes, so it cannot continue on another class list: train in a new --workdir "
        f"(this run's checkpoints are fine and still score its own classes)."
    )
  changed = identity.differences(saved_meta.get("data"), meta.get("data"), "train")
  if changed:
    raise errors.UserValueError(
        f"the training data changed: {workdir} holds a run trained on other images:\n  "
        + "\n  ".join(changed)
        + "\nIts class centres and heads were computed from its own training images: point "
        "data.root back at them to continue this run, or train on these in a new --workdir."
    )


def test_data_note(run_data: dict | None, data: dict | None) -> str | None:
  """A sentence for every result file when the test images scored are not those the run
  recorded (None when they are, or the run recorded none)."""
  changed = identity.differences(run_data, data, "test")
  if not changed:
    return None
  return (
      "the test images differ from those recorded by the run ("
      + "; ".join(changed)
      + "): these results are not comparable with the run's earlier ones"
  )
