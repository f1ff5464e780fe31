"""Devices: the 1-D mesh every step runs on, and moving batches and state onto it."""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cras_jax.engine import determinism


class Devices:
  """A 1-D mesh over devices: batches split on 'data', state replicated.

  With several processes (`jax.distributed.initialize`), the mesh spans every
  process's devices; each process passes its own contiguous share of the global
  batch (`local_slice`) and `put_batch` assembles the global array.
  """

  def __init__(self, devices=None):
    devices = list(jax.devices() if devices is None else devices)
    self.mesh = Mesh(np.array(devices), ("data",))
    self.count = len(devices)
    self.replicated = NamedSharding(self.mesh, P())
    self.batch = NamedSharding(self.mesh, P("data"))

  @staticmethod
  def local_slice(global_batch_size: int) -> slice:
    """This process's rows of a global batch (processes own contiguous blocks)."""
    n, i = jax.process_count(), jax.process_index()
    per = global_batch_size // n
    return slice(i * per, (i + 1) * per)

  def put_batch(self, batch: dict):
    """Host arrays (this process's share) -> global arrays sharded on 'data'."""
    return {
        k: jax.make_array_from_process_local_data(self.batch, v)
        for k, v in batch.items()
        if isinstance(v, np.ndarray)
    }

  @staticmethod
  def gather(tree):
    """Batch-sharded global arrays -> full host arrays on every process."""
    if jax.process_count() == 1:
      return jax.tree.map(np.asarray, tree)
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))

  def put_replicated(self, tree):
    """Identical host values on every process -> replicated global arrays."""
    return jax.tree.map(
        lambda x: jax.make_array_from_callback(
            np.shape(x), self.replicated, lambda idx: np.asarray(x)[idx]
        ),
        tree,
    )

  def jit_train(self, fn, deterministic: bool = False):
    """(state, batch) -> (state, metrics): batch split, state replicated and donated;
    `deterministic`: compiled with deterministic ops (engine/determinism.py)."""
    return jax.jit(
        fn,
        in_shardings=(self.replicated, self.batch),
        out_shardings=(self.replicated, self.replicated),
        donate_argnums=0,
        compiler_options=determinism.COMPILER_OPTIONS if deterministic else None,
    )

  def jit_predict(self, fn):
    """(replicated variables, batch of images) -> outputs split like the batch."""
    return jax.jit(fn, in_shardings=(self.replicated, self.batch), out_shardings=self.batch)

  def jit_prepare(self, fn):
    """Replicated state -> replicated variables (e.g. a model's scoring variables)."""
    return jax.jit(fn, in_shardings=self.replicated, out_shardings=self.replicated)
