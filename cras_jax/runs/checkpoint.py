"""Orbax checkpoints of the training state plus a JSON record of the run.

Each checkpoint step holds two items: `state` (params, batch_stats, opt_state,
centres, noise_std, step, rng: everything but the frozen backbone, which is
rebuilt from its weights source) and `meta` (class names, config, versions).
"""

from __future__ import annotations

import logging as py_logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from cras_jax.base import errors

_T = TypeVar("_T")


# What orbax and TensorStore leave behind when a reader's step is pruned while it reads it (the
# reader then reads the newest step: `_listing`, `restore_good`): a step's metadata missing, and
# the aborted read's coroutines and callbacks, reported when they are collected after their
# event loop closed. Readers drop these; any other report passes through.
_PRUNED_READ_NOISE = ("Event loop is closed", "Encountered error while reading array index")
_PRUNED_READ_LOGS = ("Metadata file does not exist",)
# the metadata file there when orbax checked, gone (pruned) when it read it
_PRUNED_READ_GONE = "Failed to read Metadata file"
# an aborted read's task, reported by asyncio when it is collected ("Task exception was never
# retrieved"): it failed on the pruned step's files, gone (TensorStore's open "NOT_FOUND: Error
# opening ... does not exist", orbax's "Checkpoint directory does not exist")
_PRUNED_READ_TASKS = ("NOT_FOUND: Error opening", "Checkpoint directory does not exist")


class _DropPrunedReadLogs(py_logging.Filter):

  def filter(self, record: py_logging.LogRecord) -> bool:
    msg = str(record.msg)
    if msg.startswith(_PRUNED_READ_GONE):
      args = record.args if isinstance(record.args, tuple) else ()
      return not any(isinstance(a, FileNotFoundError) for a in args)
    return not msg.startswith(_PRUNED_READ_LOGS)


class _DropPrunedReadTasks(py_logging.Filter):

  def filter(self, record: py_logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    return not (
        str(record.msg).split("\n", 1)[0].endswith("exception was never retrieved")
        and str(error).startswith(_PRUNED_READ_TASKS)
        and "does not exist" in str(error)
    )


def _quiet_pruned_reads() -> None:
  """Installs, once per process, the filters of `_PRUNED_READ_NOISE`, `_PRUNED_READ_LOGS`,
  `_PRUNED_READ_GONE` and `_PRUNED_READ_TASKS`."""
  previous = sys.unraisablehook
  if getattr(previous, "drops_pruned_reads", False):
    return

  def hook(unraisable) -> None:
    if str(unraisable.exc_value).startswith(_PRUNED_READ_NOISE):
      return
    previous(unraisable)

  hook.drops_pruned_reads = True
  sys.unraisablehook = hook
  py_logging.getLogger("absl").addFilter(_DropPrunedReadLogs())
  py_logging.getLogger("asyncio").addFilter(_DropPrunedReadTasks())


def manager(workdir: str, max_to_keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
  """The workdir's checkpoints. For training (the workdir locked): saves are synchronous and
  atomic (written to a temporary directory, then renamed) and temporary directories of an
  interrupted save are removed on start. `read_only` (scoring, export, any reader of a run,
  which may run while a training saves): nothing is created, removed or deleted."""
  if max_to_keep < 1:
    raise ValueError(f"max_to_keep={max_to_keep}: at least the latest checkpoint is kept")
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None if read_only else max_to_keep,
      save_interval_steps=0 if read_only else 1,
      create=not read_only,
      enable_async_checkpointing=False,
      cleanup_tmp_directories=not read_only,
      read_only=read_only,
  )
  verbosity = logging.get_verbosity()
  if read_only:  # orbax warns "Given directory is read only" on every reader
    logging.set_verbosity(logging.ERROR)
    _quiet_pruned_reads()
  try:
    return _listing(
        lambda: ocp.CheckpointManager(
            os.path.abspath(os.path.join(workdir, "checkpoints")),
            options=options,
            item_names=("state", "meta"),
        )
    )
  finally:
    logging.set_verbosity(verbosity)


def save(mngr: ocp.CheckpointManager, step: int, state_tree: Any, meta: dict) -> None:
  mngr.save(
      step,
      args=ocp.args.Composite(
          state=ocp.args.StandardSave(state_tree), meta=ocp.args.JsonSave(meta)
      ),
      force=True,
  )
  mngr.wait_until_finished()


# A reader beside a training that saves and prunes (`train.keep_checkpoints`) can choose a
# step that is deleted while it reads it: it then lists the steps again and takes the newest,
# up to this many times (a pruned step is not a damaged one).
PRUNED_RETRIES = 50


def _listing(read: Callable[[], _T]) -> _T:
  """`read()` (a listing of the steps: opening a manager, `reload`), again when a step it
  listed vanished before its metadata was read (pruned by a training meanwhile; orbax then
  raises FileNotFoundError or NotADirectoryError), up to PRUNED_RETRIES times."""
  for attempt in range(PRUNED_RETRIES):
    try:
      return read()
    except (FileNotFoundError, NotADirectoryError):  # orbax raises the latter without errno
      if attempt == PRUNED_RETRIES - 1:
        raise
      time.sleep(0.05)
  raise AssertionError("unreachable")


def reload(mngr: ocp.CheckpointManager) -> None:
  """`mngr.reload()` that survives a step pruned while the steps are listed (`_listing`)."""
  _listing(mngr.reload)


def _gone(mngr: ocp.CheckpointManager, step: int) -> bool:
  """Whether `step` was superseded since it was listed: removed from disk (or being removed)
  by a training that prunes, which it does only after saving a newer step; so also whenever a
  newer complete step exists now (read that one instead)."""
  folder = str(mngr.directory)
  if not os.path.isdir(os.path.join(folder, str(step))):
    return True
  try:
    names = os.listdir(folder)
  except OSError:
    return True
  return any(n.isdigit() and int(n) > step for n in names)


def restore_meta(mngr: ocp.CheckpointManager, step: int | None = None) -> dict | None:
  """The meta item of `step`, or (step None) of the newest checkpoint whose meta is readable
  (a step with a missing or damaged meta item is passed over, as `restore_good` does; one
  pruned while it was read: the steps are listed again). None when no step has one; a
  UserValueError when every listing's steps were pruned before their meta was read."""
  if step is not None:
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  for _ in range(PRUNED_RETRIES):
    pruned = False
    for s in sorted(mngr.all_steps(), reverse=True):
      try:
        meta = mngr.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      except Exception:  # noqa: BLE001 - a damaged step: the previous one
        pruned = pruned or _gone(mngr, s)
        continue
      if isinstance(meta, dict) and "config" in meta and "class_names" in meta:
        return meta
    if not pruned:
      return None
    time.sleep(0.1)
    reload(mngr)
  raise _pruned_while_read(mngr)


def restore(mngr: ocp.CheckpointManager, abstract_state: Any, step: int | None = None):
  """Restores (state_tree, meta) of `step` (default latest) onto abstract_state's shardings."""
  step = mngr.latest_step() if step is None else step
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
  out = mngr.restore(
      step,
      args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
      ),
  )
  if not isinstance(out["meta"], dict) or "class_names" not in out["meta"]:
    raise ValueError("the meta item is missing or incomplete")
  return out["state"], out["meta"]


def _finite(tree) -> bool:
  return all(
      np.isfinite(np.asarray(x)).all()
      for x in jax.tree.leaves(tree)
      if np.issubdtype(np.asarray(x).dtype, np.floating)
  )


def restore_good(mngr: ocp.CheckpointManager, abstract_state: Any, quarantine: bool = True):
  """Restores the newest readable checkpoint, falling back over corrupted ones.

  Returns (state_tree, meta, step, skipped) where skipped lists
  (step, reason) for every newer checkpoint that could not be read. `quarantine` (training
  only, the workdir locked): those are moved to corrupted_checkpoints/; readers move nothing.
  """
  for _ in range(PRUNED_RETRIES):
    reload(mngr)  # the steps on disk now (another process may have saved, or pruned)
    found = _restore_newest(mngr, abstract_state, quarantine)
    if found is not None:
      return found
    time.sleep(0.1)  # every step we listed was pruned while we read it: list them again
  raise _pruned_while_read(mngr)


def _pruned_while_read(mngr: ocp.CheckpointManager) -> errors.UserValueError:
  """The error of a reader whose every listing lost its steps to a training's pruning."""
  return errors.UserValueError(
      f"{mngr.directory}: every checkpoint was removed while it was read, {PRUNED_RETRIES} "
      f"times (a training saving and pruning very fast?); try again"
  )


def _restore_newest(mngr: ocp.CheckpointManager, abstract_state: Any, quarantine: bool):
  """`restore_good`'s pass over the steps listed now: the result, the error, or None when a
  step was pruned while it was read (list again: a newer one was saved)."""
  skipped = []
  listed = sorted(mngr.all_steps(), reverse=True)
  if not listed:
    return None  # between a training's prune and its next save: list again
  for step in listed:
    try:
      tree, meta = restore(mngr, abstract_state, step)
      if not _finite(tree):
        raise ValueError("non-finite values in the saved state")
      if (
          skipped and quarantine
      ):  # keep the unreadable steps for inspection, out of the manager's way
        quarantine = os.path.join(os.path.dirname(str(mngr.directory)), "corrupted_checkpoints")
        os.makedirs(quarantine, exist_ok=True)
        for bad, _ in skipped:
          os.replace(
              os.path.join(str(mngr.directory), str(bad)),
              os.path.join(quarantine, f"{bad}-{int(time.time())}"),
          )
        mngr.reload()
      return tree, meta, step, skipped
    except Exception as e:  # a truncated/corrupted step: try the previous one
      if _gone(mngr, step):
        return None  # deleted by a training while we read it: not damaged
      skipped.append((step, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
  steps = ", ".join(f"{s} ({r})" for s, r in skipped)
  raise errors.UserValueError(
      f"{mngr.directory}: no checkpoint could be restored; tried {steps}. If they were "
      f"written by another version or for another configuration, use that, or train in a new "
      f"--workdir; nothing here was removed."
  )
