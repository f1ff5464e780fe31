"""Devices: the 1-D mesh every step runs on, moving batches and state onto it, and the form
its steps are compiled in (`train.parallelism`, docs/training.md "Parallelism: jit, shard_map, pmap"):

- "jit": `jax.jit` with `NamedSharding`s; the step is written for the whole batch and XLA's
  SPMD partitioner splits it and inserts the collectives (the default: the compiler may fuse
  and schedule the exchanges, and the same code runs on one device, a mesh or several
  processes).
- "shard_map": the step written per device (`jax.shard_map`), with explicit `pmean`s of the
  BatchNorm statistics, gradients and metrics; state replicated, batch split on 'data'.
- "pmap": the same per-device step under `jax.pmap` (the design card's form): the batch
  reshaped to [devices, per-device, ...], the state broadcast (`in_axes=None`) and returned
  once (`out_axes=None`). It runs inside one `jax.jit`, which carries the donation and the
  compiler options (JAX itself lowers pmap through jit and shard_map since 0.4.x's merge).

The three give the same results to float rounding (tests/engine/test_parallelism.py).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cras_jax.base import errors
from cras_jax.engine import determinism, steps

FORMS = ("jit", "shard_map", "pmap")  # schema.choices("train.parallelism")
AXIS = "data"


class Devices:
  """A 1-D mesh over devices: batches split on 'data', state replicated.

  With several processes (`jax.distributed.initialize`), the mesh spans every
  process's devices; each process passes its own contiguous share of the global
  batch (`local_slice`) and `put_batch` assembles the global array.
  """

  def __init__(self, devices=None, parallelism: str = "jit"):
    if parallelism not in FORMS:
      raise ValueError(f"parallelism {parallelism!r}: one of {', '.join(FORMS)}")
    devices = list(jax.devices() if devices is None else devices)
    self.mesh = Mesh(np.array(devices), (AXIS,))
    self.count = len(devices)
    self.parallelism = parallelism
    self.replicated = NamedSharding(self.mesh, P())
    self.batch = NamedSharding(self.mesh, P(AXIS))

  @property
  def axis_name(self) -> str | None:
    """The mesh axis per-device steps average over (None: the jit form, whole-batch code)."""
    return None if self.parallelism == "jit" else AXIS

  def check_batch(self, batch_size: int, field: str = "train.batch_size") -> None:
    """Refuses, before any work, a global batch the data axis does not split evenly: every
    device takes the same number of rows, so a batch of 8 on 3 devices would drop 2 images of
    every batch, and a batch smaller than the device count would leave devices empty.
    (The last batch of an epoch, cut short by the dataset's size, is trimmed to a multiple of
    the count: `training.loop.batch_indices`; the images cut there differ every epoch.)"""
    problem = batch_problem(batch_size, self.count, field)
    if problem:
      raise errors.UserValueError(problem)

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

  def compile_train(self, spec, deterministic: bool = False):
    """The training step of `spec` in this mesh's form: (state, batch) -> (state, metrics),
    batch split, state replicated and donated. The noise is drawn for the global batch by
    the jitted program (partitioned: each device computes its rows), so the three forms
    train on the same noise."""
    if self.parallelism == "jit":
      return self.jit_train(steps.make_train_step(spec), deterministic)
    core = steps.make_train_core(spec, AXIS)
    per_device = self._per_device(
        core, (P(), P(AXIS), P(AXIS)), (P(), P()), (None, 0, 0), (None, None)
    )

    def train_step(state, batch):
      noise = steps.draw_noise(spec, state, batch["label"].shape[0])
      noise = jax.lax.with_sharding_constraint(noise, self.batch)
      return per_device(state, batch, noise)

    return self.jit_train(train_step, deterministic)

  def jit_predict(self, fn):
    """(replicated variables, batch of images) -> outputs split like the batch. In the
    per-device forms `fn` runs on each device's share: build it with `axis_name` (e.g.
    `steps.make_predict_step(spec, axis_name=devices.axis_name)`) where it needs the batch."""
    if self.parallelism != "jit":
      fn = self._per_device(fn, (P(), P(AXIS)), P(AXIS), (None, 0), 0)
    return jax.jit(fn, in_shardings=(self.replicated, self.batch), out_shardings=self.batch)

  def _per_device(self, fn, in_specs, out_specs, in_axes, out_axes):
    """`fn` written per device -> the whole-batch function, by shard_map (`in_specs`,
    `out_specs`) or pmap (`in_axes`, `out_axes`: None replicated, 0 split like the batch)."""
    if self.parallelism == "shard_map":
      # No replication checks: `fn` averages explicitly, and pmap's autodiff semantics (an
      # all-reduce transposes to an all-reduce) are the ones `steps.make_train_core` assumes.
      return jax.shard_map(
          fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
      )
    n = self.count
    mapped = jax.pmap(
        fn, axis_name=AXIS, in_axes=in_axes, out_axes=out_axes, devices=list(self.mesh.devices)
    )
    split = lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:])
    merge = lambda x: x.reshape(n * x.shape[1], *x.shape[2:])

    @functools.wraps(fn)  # the step's name in compiled modules and profiles
    def whole(*args):
      args = [a if ax is None else jax.tree.map(split, a) for a, ax in zip(args, in_axes)]
      out = mapped(*args)
      if out_axes == 0:
        return jax.tree.map(merge, out)
      return out

    return whole

  def jit_prepare(self, fn):
    """Replicated state -> replicated variables (e.g. a model's scoring variables)."""
    return jax.jit(fn, in_shardings=self.replicated, out_shardings=self.replicated)


def batch_problem(batch_size: int, count: int, field: str = "train.batch_size") -> str | None:
  """Why `batch_size` cannot be split over `count` devices (None: it can)."""
  if count <= 1 or (batch_size >= count and batch_size % count == 0):
    return None
  lower = batch_size // count * count
  options = " or ".join(str(b) for b in (lower, lower + count) if b >= count)
  return (
      f"{field}={batch_size}: the batch is split evenly over the {count} devices, which "
      f"{batch_size} is not a multiple of; use {options}, or fewer devices"
  )
