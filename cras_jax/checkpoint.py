"""Orbax checkpoints of the training state plus a JSON record of the run.

Each checkpoint step holds two items: `state` (params, batch_stats, opt_state,
centres, noise_std, step, rng: everything but the frozen backbone, which is
rebuilt from its weights source) and `meta` (class names, config, versions).
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def manager(workdir: str, max_to_keep: int = 3) -> ocp.CheckpointManager:
  # Saves are synchronous and atomic (written to a temporary directory, then
  # renamed); temporary directories of an interrupted save are removed on start.
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      create=True,
      enable_async_checkpointing=False,
      cleanup_tmp_directories=True,
  )
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=options,
      item_names=("state", "meta"),
  )


def save(mngr: ocp.CheckpointManager, step: int, state_tree: Any, meta: dict) -> None:
  mngr.save(
      step,
      args=ocp.args.Composite(
          state=ocp.args.StandardSave(state_tree), meta=ocp.args.JsonSave(meta)
      ),
      force=True,
  )
  mngr.wait_until_finished()


def restore_meta(mngr: ocp.CheckpointManager, step: int | None = None) -> dict | None:
  step = mngr.latest_step() if step is None else step
  if step is None:
    return None
  return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


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
  return out["state"], out["meta"]


def _finite(tree) -> bool:
  return all(
      np.isfinite(np.asarray(x)).all()
      for x in jax.tree.leaves(tree)
      if np.issubdtype(np.asarray(x).dtype, np.floating)
  )


def restore_good(mngr: ocp.CheckpointManager, abstract_state: Any):
  """Restores the newest readable checkpoint, falling back over corrupted ones.

  Returns (state_tree, meta, step, skipped) where skipped lists
  (step, reason) for every newer checkpoint that could not be read.
  """
  skipped = []
  mngr.reload()  # the steps on disk now (another process may have saved)
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      tree, meta = restore(mngr, abstract_state, step)
      if not _finite(tree):
        raise ValueError("non-finite values in the saved state")
      if skipped:  # keep the unreadable steps for inspection, out of the manager's way
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
      skipped.append((step, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
  steps = ", ".join(f"{s} ({r})" for s, r in skipped)
  raise RuntimeError(
      f"{mngr.directory}: no readable checkpoint; tried {steps}. "
      f"Remove the directory to start afresh."
  )
