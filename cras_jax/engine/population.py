"""A population of heads: S training states on a leading model axis, one compiled step.

Only the heads (adapter, discriminator, their optimiser states, centres, noise scale, rng and
the `steps.HPARAMS` they train with) differ between members; the frozen backbone is shared.
A population step runs the single-run train step (`steps.make_train_step`) for every member
on one shared batch, or, with a per-member data order (`train.member_data_order`), on each
member's own batch: a batch with a leading member axis (`per_member=True`; labels, images or
stored features per member, laid out by `PopulationDevices.put_member_batch`). A shared batch
of images goes through the backbone once; per-member batches of images go through it once per
member (S times the backbone's cost: why "auto" shares the order when the backbone runs in the
step). It runs in one of two forms (`BATCHINGS`, config `train.population_batching`):

- "map": the single run's compiled step, once per member (`make_member_loop`). Every member
  runs the very program of its run alone, so it is bit-identical to it (tested; on images,
  to the single run on stored features: the backbone runs once, in its own program); on a CPU
  it is as fast as "vmap" (the heads' products are compute-bound there).
- "vmap": `jax.vmap`, the members' products batched into larger ones: what fills a GPU or TPU.
  A member then equals its run alone up to float32 rounding (the batched products and the
  weight gradients of the shared features sum in another order).

"auto" is "map" on the CPU backend with one device along the members, "vmap" otherwise.
`PopulationDevices` lays the members on a 2-D mesh ("model", "data"): members split on
"model", the batch on "data".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cras_jax.engine import determinism, sharding, steps


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


BATCHINGS = ("auto", "map", "vmap")


def resolve_batching(batching: str, model_shards: int = 1, platform: str | None = None) -> str:
  """The form `batching` means: "auto" is "map" on the CPU backend (default: JAX's) with one
  device along the members, else "vmap"; "map" needs model_shards == 1 (it runs the members
  one after another on every device)."""
  if batching not in BATCHINGS:
    raise ValueError(f"train.population_batching={batching!r}: choose one of {BATCHINGS}")
  if batching == "auto":
    cpu = (platform or jax.default_backend()) == "cpu"
    return "map" if cpu and model_shards == 1 else "vmap"
  if batching == "map" and model_shards > 1:
    raise ValueError(
        f"train.population_batching='map' runs the members one after another on every device; "
        f"with train.population_model_shards={model_shards} use 'vmap' (or 'auto')"
    )
  return batching


# ----------------------------------------------------------------------------- "vmap"


def make_population_step(spec: steps.ModelSpec, per_member: bool = False) -> Callable:
  """The "vmap" form: (stacked state, batch) -> (stacked state, metrics [S]), one pure
  function to jit. A shared batch of images goes through the frozen backbone once and every
  member trains on the same features; with `per_member`, the batch has a leading member axis
  and member k trains on its row (images: the backbone vmapped over the members)."""
  members_step = jax.vmap(steps.make_train_step(spec), in_axes=(0, 0 if per_member else None))

  def population_step(state: steps.TrainState, batch) -> tuple[steps.TrainState, dict]:
    backbone = state.backbone
    if "features" not in batch:
      embed = lambda images: spec.features(backbone, images)
      if per_member:
        embed = jax.vmap(embed)
      batch = {"features": embed(batch["image"]), "label": batch["label"]}
    new, metrics = members_step(state.replace(backbone=None), batch)
    return new.replace(backbone=backbone), metrics

  return population_step


def make_centre_step(spec: steps.ModelSpec) -> Callable:
  """`steps.make_centre_step` vmapped over the members: (acc [S, ...], heads [S], t, labels,
  weights, centre_weights) with the batch shared."""
  return jax.vmap(steps.make_centre_step(spec), in_axes=(0, 0, None, None, None, None))


# ----------------------------------------------------------------------------- "map"


@jax.jit
def split(tree) -> list:
  """A tree with a leading member axis -> the list of its members (one dispatch)."""
  n = jax.tree.leaves(tree)[0].shape[0]
  return [jax.tree.map(lambda x, k=k: x[k], tree) for k in range(n)]


@jax.jit
def stack_trees(trees: list):
  """The inverse of `split` (one dispatch)."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def make_member_loop(
    member_step: Callable, embed: Callable | None = None, per_member: bool = False
) -> Callable:
  """The "map" form, run from the host: (stacked state, batch) -> (stacked state, metrics [S]).

  member_step: the single run's compiled train step (`steps.make_train_step`, jitted as a
  single run jits it), called once per member on the shared batch (with `per_member`, on the
  member's row of a batch with a leading member axis), so every member runs the very program
  of its run alone and is bit-identical to it. (One program over all members, `jax.lax.map`
  inside a jit, is not: XLA:CPU contracts multiply-adds into FMAs differently in another
  program.) A batch of images goes through `embed` (backbone variables, images -> features):
  a shared batch once, per-member batches once per member."""

  def population_step(state: steps.TrainState, batch) -> tuple[steps.TrainState, dict]:
    backbone = state.backbone
    heads = split(state.replace(backbone=None))
    if per_member:
      batches = split(batch)
    else:
      if "features" not in batch:
        batch = {"features": embed(backbone, batch["image"]), "label": batch["label"]}
      batches = [batch] * len(heads)
    new_heads, metrics = [], []
    for m, b in zip(heads, batches):
      if "features" not in b:
        b = {"features": embed(backbone, b["image"]), "label": b["label"]}
      # The single step donates its state, the backbone too: pass on the one it returns.
      new, met = member_step(m.replace(backbone=backbone), b)
      backbone = new.backbone
      new_heads.append(new.replace(backbone=None))
      metrics.append(met)
    return stack_trees(new_heads).replace(backbone=backbone), stack_trees(metrics)

  return population_step


def make_member_centre_loop(centre_step: Callable) -> Callable:
  """The "map" form of `make_centre_step`: `centre_step` (the single run's, jitted) per member."""

  def population_centre_step(acc, heads, *shared):
    return stack_trees([centre_step(a, h, *shared) for a, h in zip(split(acc), split(heads))])

  return population_centre_step


class PopulationDevices(sharding.Devices):
  """A 2-D mesh ("model", "data"): `model_shards` devices along the members, the rest along
  the batch. Batches split on "data" (replicated along "model"; a per-member batch, with a
  leading member axis, splits its second axis on "data"); a stacked state splits its members on
  "model" and its shared backbone is replicated."""

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
    self.parallelism = "jit"  # populations train with jit only (train.parallelism)
    self.replicated = NamedSharding(self.mesh, P())
    self.batch = NamedSharding(self.mesh, P("data"))
    self.member_batch = NamedSharding(self.mesh, P(None, "data"))
    self.members = NamedSharding(self.mesh, P("model"))

  def put_member_batch(self, batch: dict):
    """Host arrays [members, this process's share of the batch, ...] -> global arrays split
    on "data" along their second axis (every member's batch beside the others')."""
    return {
        k: jax.make_array_from_process_local_data(self.member_batch, v)
        for k, v in batch.items()
        if isinstance(v, np.ndarray)
    }

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

  def jit_population(
      self, fn, state: steps.TrainState, deterministic: bool = False, per_member: bool = False
  ):
    """(stacked state, batch) -> (stacked state, metrics [S]): state donated; `per_member`:
    the batch has a leading member axis (`put_member_batch`)."""
    shardings = self.state_shardings(state)
    return jax.jit(
        fn,
        in_shardings=(shardings, self.member_batch if per_member else self.batch),
        out_shardings=(shardings, self.members),
        donate_argnums=0,
        compiler_options=determinism.COMPILER_OPTIONS if deterministic else None,
    )

  def population_step(
      self,
      spec: steps.ModelSpec,
      state,
      batching: str,
      deterministic: bool = False,
      per_member: bool = False,
  ) -> Callable:
    """The compiled population step in the form `batching` (`resolve_batching`): "map" runs
    the single run's step (`jit_train`, as `training.train` compiles it) once per member;
    "vmap" one vmapped program over the members. `per_member`: batches with a leading member
    axis, one data order per member (`training.loop.train_batches`)."""
    if resolve_batching(batching, self.model_shards) == "vmap":
      step = make_population_step(spec, per_member)
      return self.jit_population(step, state, deterministic, per_member)
    member = self.jit_train(steps.make_train_step(spec), deterministic)
    return make_member_loop(member, self.jit_predict(spec.features), per_member)
