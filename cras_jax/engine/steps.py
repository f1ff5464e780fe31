"""The model's steps and their state: what every run compiles.

`TrainState` is the whole training state (one pytree); `ModelSpec` the static model the steps
close over; the step builders return pure functions (train, prepare, predict, embed, centre)
that `sharding.Devices` jits and shards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from cras_jax import backbones
from cras_jax.backbones import layers
from cras_jax.data import preprocess
from cras_jax.engine import model
from cras_jax.method import centres as centres_lib

# ----------------------------------------------------------------------------- state


@flax.struct.dataclass
class TrainState:
  """The whole training state, one pytree.

  `backbone` holds the frozen feature extractor's variables: they are inputs of
  every step but not in `params`, so the optimiser never sees them.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  centres: jax.Array  # [K, HW, D], fixed after initialisation
  noise_std: jax.Array  # scalar: feature std used by relative noise (1.0 otherwise)
  rng: jax.Array
  backbone: Any = None
  # The settings a population may vary (`HPARAMS`), as float32 arrays the step reads: set from
  # the config, never checkpointed. A single run reads them like a population member does,
  # so both compile the same arithmetic (member k of a population equals the run alone).
  hparams: Any = None

  def checkpointable(self) -> dict:
    return {
        "step": self.step,
        "params": self.params,
        "batch_stats": self.batch_stats,
        "opt_state": self.opt_state,
        "centres": self.centres,
        "noise_std": self.noise_std,
        "rng": self.rng,
    }


def make_optimizer(lr_adapter: float, wd_adapter: float, lr_disc: float, wd_disc: float):
  """docs/method.md §8: AdamW for the adapter; Adam with coupled L2 decay for the discriminator."""
  adapter_tx = optax.adamw(lr_adapter, b1=0.9, b2=0.999, eps=1e-8, weight_decay=wd_adapter)
  disc_tx = optax.chain(
      optax.add_decayed_weights(wd_disc),
      optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
      optax.scale(-lr_disc),
  )
  labels = lambda params: {k: jax.tree.map(lambda _: k, v) for k, v in params.items()}
  return optax.multi_transform({"adapter": adapter_tx, "disc": disc_tx}, labels)


def optimizer_from_config(cfg) -> optax.GradientTransformation:
  t = cfg.train
  return make_optimizer(t.lr_adapter, t.wd_adapter, t.lr_disc, t.wd_disc)


# The settings that change only the heads' training (noise, DAFS, optimiser): the step reads
# them from `TrainState.hparams`, so a population can give each member its own.
HPARAMS = {
    "noise_sigma": "model.noise_sigma",
    "dafs_beta": "model.dafs_beta",
    "lr_adapter": "train.lr_adapter",
    "wd_adapter": "train.wd_adapter",
    "lr_disc": "train.lr_disc",
    "wd_disc": "train.wd_disc",
}


def hparams_from_config(config) -> dict:
  """`HPARAMS` of a config as float32 scalars (the values `TrainState.hparams` holds)."""
  out = {}
  for name, field in HPARAMS.items():
    section, key = field.split(".")
    out[name] = jnp.asarray(config[section][key], jnp.float32)
  return out


# ----------------------------------------------------------------------------- model spec


class ModelSpec:
  """The static model a run's steps close over: its modules and settings, no arrays.

  Built from a config and the number of classes; `grid` and `num_patches` (the first
  level's patch grid) come from shapes alone.
  """

  def __init__(
      self,
      config: ml_collections.ConfigDict,
      num_classes: int,
      grid: tuple[int, int] | None = None,
  ):
    """`grid`: the patch grid when already known (a trained run's meta records it), which
    spares tracing the backbone at every start."""
    m = config.model
    self.config = config
    self.num_classes = num_classes
    # "auto" kernels: the form for JAX's default backend, fixed when the spec is built.
    self.kernels = layers.resolve_kernels(m.kernels)
    self.heads = dataclasses.replace(model.HeadsConfig.from_config(m), kernels=self.kernels)
    self.backbone = backbones.build_module(m.backbone, m.dtype, self.kernels)
    self.embed = model.make_embed_fn(
        self.backbone,
        tuple(m.levels),
        m.pre_embed_dim,
        m.embed_dim,
        m.patch_size,
        self.kernels,
        aggregate_dtype=m.aggregate_dtype,
    )
    self.tx = optimizer_from_config(config)
    self.image_size = config.data.crop
    if grid is not None:
      self.grid, self.num_patches = tuple(grid), int(grid[0]) * int(grid[1])
    else:
      self.grid, self.num_patches = self._grid()

  def _grid(self):
    """Patch grid (h, w) of the first level and HW, from shapes alone."""
    levels = tuple(self.config.model.levels)
    x = jax.ShapeDtypeStruct((1, self.image_size, self.image_size, 3), jnp.float32)
    # One trace: the variables' init runs the levels needed (init_with_output's output).
    feats, _ = jax.eval_shape(
        lambda r, x: self.backbone.init_with_output(r, x, max_level=max(levels)),
        jax.random.PRNGKey(0),
        x,
    )
    grid = tuple(feats[f"level{levels[0]}"].shape[1:3])
    return grid, grid[0] * grid[1]

  def features(self, backbone_vars, images_uint8):
    return self.embed(backbone_vars, preprocess.normalize(images_uint8))[0]

  def used_backbone(self, backbone_vars):
    """The backbone variables the steps read: those of the stages up to the last level used.
    Later stages and the classifier stay out of the training state, where every step would
    take them as arguments (WideResNet50-2's layer4 and fc: 176 MB in float32, against 100 MB
    for layers 1-3)."""
    size = self.image_size
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    max_level = max(self.config.model.levels)
    used = jax.eval_shape(
        lambda x: self.backbone.init(jax.random.PRNGKey(0), x, max_level=max_level), x
    )
    return _select(backbone_vars, used)


def _select(tree, like):
  """tree's entries at like's keys (nested mappings), like's structure."""
  if tree is None or not hasattr(like, "keys"):
    return tree
  return {k: _select(tree[k], like[k]) for k in like.keys()}


def _initial_state(spec: ModelSpec, seed) -> TrainState:
  rng = jax.random.PRNGKey(seed)
  init_rng, state_rng = jax.random.split(rng)
  params, batch_stats = model.init_heads(spec.heads, init_rng)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=batch_stats,
      opt_state=spec.tx.init(params),
      centres=jnp.zeros((spec.num_classes, spec.num_patches, spec.heads.embed_dim), jnp.float32),
      noise_std=jnp.ones((), jnp.float32),
      rng=state_rng,
  )


def create_state(spec: ModelSpec, backbone_vars, seed: int) -> TrainState:
  """A fresh training state, with the frozen backbone's variables beside it.

  Built by one jitted function: run op by op, the initialisers compiled about a hundred
  tiny programs at every start (about 3 s of a run's start-up on a CPU)."""
  state = jax.jit(_initial_state, static_argnums=0)(spec, seed)
  return state.replace(
      backbone=spec.used_backbone(backbone_vars), hparams=hparams_from_config(spec.config)
  )


# ----------------------------------------------------------------------------- steps


def draw_noise(spec: ModelSpec, state: TrainState, batch_size: int) -> jax.Array:
  """The step's Gaussian noise g [B, HW, D], scaled by sigma (`noise_sigma * noise_std`), from
  `fold_in(state.rng, state.step)`. One draw for the global batch: with JAX's partitionable
  threefry, a program whose noise is split over devices computes only each device's rows."""
  hp = hparams_from_config(spec.config) if state.hparams is None else state.hparams
  rng = jax.random.fold_in(state.rng, state.step)
  sigma = hp["noise_sigma"] * state.noise_std
  shape = (batch_size, spec.num_patches, spec.heads.embed_dim)
  return sigma * jax.random.normal(rng, shape, jnp.float32)


def make_train_core(spec: ModelSpec, axis_name: str | None = None) -> Callable:
  """(state, batch, noise) -> (state, metrics): the training step on given noise.

  `axis_name`: None for the whole (global) batch, as `jax.jit` partitions it; else the mesh
  axis of per-device code (`shard_map`, `pmap`: engine/sharding.py), which sees its share of
  the batch and averages over the axis, explicitly, the BatchNorm statistics, the gradients
  and the metrics."""
  cfg = spec.heads
  defaults = hparams_from_config(spec.config)
  mean = (lambda x: x) if axis_name is None else (lambda x: jax.lax.pmean(x, axis_name))

  def train_core(state: TrainState, batch, noise) -> tuple[TrainState, dict]:
    hp = defaults if state.hparams is None else state.hparams
    if "features" in batch:  # cached frozen-backbone features
      t = batch["features"].astype(jnp.float32)
    else:
      t = spec.features(state.backbone, batch["image"])
    grad_fn = jax.value_and_grad(model.heads_loss, has_aux=True)
    (_, aux), grads = grad_fn(
        state.params,
        state.batch_stats,
        t,
        batch["label"],
        state.centres,
        noise,
        cfg,
        hp["dafs_beta"],
        axis_name,
    )
    # Per-device code: each device's gradient of its own loss, averaged (under pmap and
    # shard_map without replication checks, the BatchNorm all-reduce transposes to an
    # all-reduce, so the mean of these gradients is the whole batch's).
    grads = mean(grads)
    tx = make_optimizer(hp["lr_adapter"], hp["wd_adapter"], hp["lr_disc"], hp["wd_disc"])
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = mean(dict(aux["metrics"]))
    metrics["grad_norm"] = optax.tree.norm(grads)
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=aux["batch_stats"], opt_state=opt_state
    )
    return new_state, metrics

  return train_core


def make_train_step(spec: ModelSpec) -> Callable:
  """(state, batch) -> (state, metrics) on the whole batch (the `jax.jit` form). The noise,
  DAFS and optimiser settings come from `state.hparams` (a state without them: from the
  config), so the step vmaps over a population of states (`engine.population`)."""
  core = make_train_core(spec)

  def train_step(state: TrainState, batch) -> tuple[TrainState, dict]:
    return core(state, batch, draw_noise(spec, state, batch["label"].shape[0]))

  return train_step


def make_prepare_step(spec: ModelSpec) -> Callable:
  """state -> the scoring variables of a trained model, computed once per model:
  the frozen backbone and `model.prepare_scoring`'s heads (folded BatchNorm,
  per-centre first-layer terms). Feed them to `make_predict_step`'s step."""

  def prepare_step(state: TrainState):
    return {
        "backbone": state.backbone,
        "heads": model.prepare_scoring(state.params, state.batch_stats, state.centres, spec.heads),
    }

  return prepare_step


def make_predict_step(
    spec: ModelSpec, with_u: bool = False, axis_name: str | None = None
) -> Callable:
  """(scoring variables, uint8 images) -> dict(scores, maps, patch, cls[, u]); `axis_name`:
  per-device code's mesh axis (`Devices.axis_name`), None for the whole batch."""

  def predict_step(svars, images):
    t = spec.features(svars["backbone"], images)
    size = (spec.image_size, spec.image_size)
    return model.score_prepared(svars["heads"], t, spec.grid, size, spec.heads, with_u, axis_name)

  return predict_step


def make_embed_step(spec: ModelSpec) -> Callable:
  """Patch features t of a batch of images (frozen backbone + aggregation)."""

  def embed_step(state: TrainState, images):
    return spec.features(state.backbone, images)

  return embed_step


def make_centre_step(spec: ModelSpec) -> Callable:
  """Accumulates class sums of u = A(t) (images weighted by centre_weights) and the
  moments of u (images weighted by weights: 0 marks padding)."""

  def centre_step(acc, state: TrainState, t, labels, weights, centre_weights):
    sums, counts, s1, s2 = acc
    u = model.adapt(state.params, t.astype(jnp.float32), spec.heads)
    sums, counts = centres_lib.accumulate(sums, counts, u, labels, weights * centre_weights)
    s1 = s1 + jnp.sum(u.mean(axis=(1, 2)) * weights)
    s2 = s2 + jnp.sum(jnp.square(u).mean(axis=(1, 2)) * weights)
    return sums, counts, s1, s2

  return centre_step
