"""A population of heads: S training states on a leading model axis, one compiled step.

Only the heads (adapter, discriminator, their optimiser states, centres, noise scale, rng and
the `steps.HPARAMS` they train with) differ between members; the frozen backbone is shared.
`make_population_step` runs the backbone once per batch, outside the vmap, and vmaps the
single-run train step (`steps.make_train_step`) over the members, so every member computes
what it would compute alone. `PopulationDevices` lays the members on a 2-D mesh
("model", "data"): members split on "model", the batch on "data".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cras_jax.engine import sharding, steps


def stack(states: Sequence[steps.TrainState]) -> steps.TrainState:
  """Member states -> one state whose leaves have a leading member axis (the backbone of the
  first member is kept, unstacked: members share it)."""
  backbone = states[0].backbone
  heads = [s.replace(backbone=None) for s in states]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *heads)
  return stacked.replace(backbone=backbone)


def member(state: steps.TrainState, k: int) -> steps.TrainState:
  """Member k of a stacked state, with the shared backbone."""
  heads = jax.tree.map(lambda x: x[k], state.replace(backbone=None))
  return heads.replace(backbone=state.backbone)


def size(state: steps.TrainState) -> int:
  return int(state.step.shape[0])


def make_population_step(spec: steps.ModelSpec) -> Callable:
  """(stacked state, batch) -> (stacked state, metrics [S]). Batches of images go through the
  frozen backbone once; every member trains on the same features."""
  train_step = steps.make_train_step(spec)
  vmapped = jax.vmap(train_step, in_axes=(0, None))

  def population_step(state: steps.TrainState, batch) -> tuple[steps.TrainState, dict]:
    backbone = state.backbone
    if "features" not in batch:
      batch = {"features": spec.features(backbone, batch["image"]), "label": batch["label"]}
    new, metrics = vmapped(state.replace(backbone=None), batch)
    return new.replace(backbone=backbone), metrics

  return population_step


def make_centre_step(spec: steps.ModelSpec) -> Callable:
  """`steps.make_centre_step` over the members: (acc [S, ...], heads [S], t, labels, weights,
  centre_weights) with the batch shared."""
  return jax.vmap(steps.make_centre_step(spec), in_axes=(0, 0, None, None, None, None))


class PopulationDevices(sharding.Devices):
  """A 2-D mesh ("model", "data"): `model_shards` devices along the members, the rest along
  the batch. Batches split on "data" (replicated along "model"); a stacked state splits its
  members on "model" and its shared backbone is replicated."""

  def __init__(self, model_shards: int = 1, devices=None):
    devices = list(jax.devices() if devices is None else devices)
    if model_shards < 1 or len(devices) % model_shards:
      raise ValueError(
          f"train.population_model_shards={model_shards}: must divide the {len(devices)} "
          f"devices"
      )
    grid = np.array(devices).reshape(model_shards, len(devices) // model_shards)
    self.mesh = Mesh(grid, ("model", "data"))
    self.count = grid.shape[1]  # batches are padded to a multiple of the data axis
    self.model_shards = model_shards
    self.replicated = NamedSharding(self.mesh, P())
    self.batch = NamedSharding(self.mesh, P("data"))
    self.members = NamedSharding(self.mesh, P("model"))

  def state_shardings(self, state: steps.TrainState):
    """Members split on "model", the backbone replicated (a pytree of shardings)."""
    heads = jax.tree.map(lambda _: self.members, state.replace(backbone=None))
    return heads.replace(backbone=jax.tree.map(lambda _: self.replicated, state.backbone))

  def put_population(self, state: steps.TrainState) -> steps.TrainState:
    """A host stacked state -> global arrays laid out by `state_shardings`."""
    shardings = self.state_shardings(state)
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(
            np.shape(x), s, lambda idx, x=x: np.asarray(x)[idx]
        ),
        state,
        shardings,
    )

  def jit_population(self, fn, state: steps.TrainState):
    """(stacked state, batch) -> (stacked state, metrics [S]): state donated."""
    shardings = self.state_shardings(state)
    return jax.jit(
        fn,
        in_shardings=(shardings, self.batch),
        out_shardings=(shardings, self.members),
        donate_argnums=0,
    )
