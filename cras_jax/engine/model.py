"""CRAS composed from its pure pieces: features -> adapter -> matching ->
DAFS -> discriminator -> loss (training) and -> anomaly map (scoring).

Nothing here knows about data loading, devices or checkpoints; `train.py`
jits and shards these functions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from cras_jax.base import schema
from cras_jax.method import anomaly_map as amap
from cras_jax.method import features, matching, synthesis
from cras_jax.method import heads as heads_lib
from cras_jax.method import loss as loss_lib
from cras_jax.method.heads import Adapter, Discriminator

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # schema.choices("model.dtype")


@dataclasses.dataclass(frozen=True)
class HeadsConfig:
  """The static settings the heads need (a hashable view of config.model)."""

  embed_dim: int = schema.default("model.embed_dim")
  adapter_layers: int = schema.default("model.adapter_layers")
  disc_layers: int = schema.default("model.disc_layers")
  noise_sigma: float = schema.default("model.noise_sigma")
  dafs_beta: float = schema.default("model.dafs_beta")
  dafs_variant: str = schema.default("model.dafs_variant")
  crd_input: str = schema.default("model.crd_input")
  hpi: bool = schema.default("model.hpi")
  per_image_matching: bool = schema.default("model.matching") == "per_image"
  score_mode: str = schema.default("model.score_mode")
  map_sigma: float = schema.default("model.map_sigma")
  dtype: Any = DTYPES[schema.default("model.dtype")]
  # The resolved `model.kernels` form ("cpu_tuned" or "xla": set by the model spec). "xla" takes
  # each image's class centres by a one-hot product, not a gather (`matching.class_rows`),
  # holds the discriminator's normal and synthetic rows parts-leading and takes its BatchNorm
  # statistics in one pass (`discriminator_split`): each saves bytes on accelerators, where
  # the steps are memory-bound; on CPUs the other forms are faster or the reference's sums.
  kernels: str = "cpu_tuned"

  @property
  def one_hot_classes(self) -> bool:
    return self.kernels == "xla"

  @property
  def parts_leading(self) -> bool:
    return self.kernels == "xla"

  @property
  def one_pass_stats(self) -> bool:
    return self.kernels == "xla"

  @classmethod
  def from_config(cls, model_cfg) -> HeadsConfig:
    dtype = DTYPES[model_cfg.dtype]
    return cls(
        embed_dim=model_cfg.embed_dim,
        adapter_layers=model_cfg.adapter_layers,
        disc_layers=model_cfg.disc_layers,
        noise_sigma=model_cfg.noise_sigma,
        dafs_beta=model_cfg.dafs_beta,
        dafs_variant=model_cfg.dafs_variant,
        crd_input=model_cfg.crd_input,
        hpi=model_cfg.hpi,
        per_image_matching=model_cfg.matching == "per_image",
        score_mode=model_cfg.score_mode,
        map_sigma=model_cfg.map_sigma,
        dtype=dtype,
    )

  @property
  def adapter(self) -> Adapter:
    return Adapter(self.embed_dim, self.adapter_layers, dtype=self.dtype)

  @property
  def discriminator(self) -> Discriminator:
    return Discriminator(self.disc_layers, dtype=self.dtype)

  @property
  def disc_input_dim(self) -> int:
    return self.embed_dim * len(loss_lib.crd_parts(self.crd_input))


def init_heads(cfg: HeadsConfig, rng: jax.Array):
  """Fresh adapter and discriminator variables -> (params, batch_stats)."""
  ra, rd = jax.random.split(rng)
  a = cfg.adapter.init(ra, jnp.zeros((1, cfg.embed_dim), jnp.float32))
  d = cfg.discriminator.init(rd, jnp.zeros((2, cfg.disc_input_dim), jnp.float32), train=False)
  return {"adapter": a["params"], "disc": d["params"]}, {"disc": d["batch_stats"]}


def make_embed_fn(
    backbone: Any,
    levels: tuple[int, ...],
    pre_embed_dim: int,
    embed_dim: int,
    patch_size: int = 3,
    form: str = "cpu_tuned",
    *,
    aggregate_dtype: str,
) -> Callable:
  """Returns embed(backbone_vars, images_normalised) -> t [B, HW, D] float32, (h, w); `form`
  is the aggregation's kernels form (backbones/layers.py FORMS); `aggregate_dtype`
  ("float32", "compute": `model.aggregate_dtype`) the dtype the levels are aggregated in."""
  max_level = max(levels)

  def embed(backbone_vars, x):
    with jax.named_scope("backbone"):
      feats = backbone.apply(backbone_vars, x, max_level=max_level)
      maps = [feats[f"level{l}"] for l in levels]
    with jax.named_scope("aggregate"):
      # float32: the levels (bfloat16 in a bfloat16 model) are aggregated into float32 t; the
      # "xla" form reads them as they are and sums in float32, the "cpu_tuned" form casts first
      dtype = jnp.float32 if aggregate_dtype == "float32" else None
      t = features.aggregate_patches(maps, pre_embed_dim, embed_dim, patch_size, form, dtype)
    # float32 for what follows (in a bfloat16 aggregation the cast fuses into t's consumers,
    # the adapter's product rounding it back to bfloat16)
    return t.astype(jnp.float32), maps[0].shape[1:3]

  return embed


def heads_loss(
    params,
    batch_stats,
    t,
    labels,
    centres,
    noise,
    cfg: HeadsConfig,
    dafs_beta=None,
    axis_name: str | None = None,
):
  """One training forward pass on patch features t [B, HW, D].

  noise: g [B, HW, D], already scaled by sigma; dafs_beta: beta (a traced value in a
  population), else `cfg.dafs_beta`. Returns (loss, aux) where aux
  holds the new BatchNorm statistics and the step's metrics. The normal and the
  synthetic rows share their matched centre p, so the discriminator's p term is
  computed once for both (`heads.discriminator_split`, an exact rewrite).

  `axis_name`: in per-device code (train.parallelism shard_map / pmap), the mesh axis the
  batch is split over: BatchNorm and DAFS average their batch statistics over it (the
  means of the batch's patches); the loss and metrics stay
  this device's (the step averages them, and the gradients, over the axis).
  """
  # Named scopes label the stages in profiles (cras_jax/benchmark.py --breakdown).
  with jax.named_scope("adapter"):
    u = cfg.adapter.apply({"params": params["adapter"]}, t)
  with jax.named_scope("matching"):
    _, p = matching.match_known(u, centres, labels, cfg.hpi, one_hot=cfg.one_hot_classes)
    # p in the compute dtype: the discriminator reads it so, and DAFS's r = |u - p| then reads
    # the same copy (in a bfloat16 model a float32 p was written, read twice and converted:
    # 1.3 of the 18 GB a v5e chip moved per training step). A float32 model is unchanged.
    p = p.astype(cfg.dtype)
  with jax.named_scope("synthesis"):
    # v = u + offset (DAFS); the discriminator takes u and the offset apart, so that the
    # products shared by the normal and the synthetic rows are computed once.
    beta = cfg.dafs_beta if dafs_beta is None else dafs_beta
    offset = synthesis.dafs_offset(u, p, noise, beta, cfg.dafs_variant, axis_name)
  d = u.shape[-1]
  with jax.named_scope("discriminator"):
    logits, new_stats = heads_lib.discriminator_split(
        params["disc"],
        batch_stats["disc"],
        u.reshape(-1, d),
        p.reshape(-1, d),
        [offset.reshape(-1, d)],
        cfg.disc_layers,
        cfg.crd_input,
        train=True,
        dtype=cfg.dtype,
        axis_name=axis_name,
        parts_leading=cfg.parts_leading,
        one_pass_stats=cfg.one_pass_stats,
    )
  lt, lf = logits[:, 0], logits[:, 1]
  with jax.named_scope("loss"):
    loss_true, loss_fake = loss_lib.bce_losses(lt, lf)
  aux = {
      "batch_stats": {"disc": new_stats},
      "metrics": {
          "loss": loss_true + loss_fake,
          "loss_true": loss_true,
          "loss_fake": loss_fake,
          # Shares of patches classified right (p < 0.5 normal, >= 0.5 synthetic).
          "p_true": jnp.mean((lt < 0).astype(jnp.float32)),
          "p_fake": jnp.mean((lf >= 0).astype(jnp.float32)),
      },
  }
  return loss_true + loss_fake, aux


def adapt(params, t, cfg: HeadsConfig):
  return cfg.adapter.apply({"params": params["adapter"]}, t)


def score_features(
    params,
    batch_stats,
    t,
    centres,
    grid: tuple[int, int],
    out_size: tuple[int, int],
    cfg: HeadsConfig,
):
  """Inference on patch features: -> dict(scores [B], maps [B, H, W], patch [B, h, w], cls [B])."""
  u = adapt(params, t, cfg)
  k, _, p = matching.match_infer(u, centres, cfg.hpi, cfg.per_image_matching, cfg.one_hot_classes)
  y = loss_lib.crd_inputs(u, p, cfg.crd_input)
  logits = cfg.discriminator.apply(
      {"params": params["disc"], "batch_stats": batch_stats["disc"]}, y, train=False
  )
  patch = jax.nn.sigmoid(logits).reshape(u.shape[0], *grid)
  maps = amap.anomaly_map(patch, out_size, cfg.map_sigma)
  return {
      "scores": amap.image_score(patch, maps, cfg.score_mode),
      "maps": maps,
      "patch": patch,
      "cls": k,
  }


def prepare_scoring(params, batch_stats, centres, cfg: HeadsConfig) -> dict:
  """What scoring needs, computed once per trained model (a pytree of arrays).

  The discriminator's inference BatchNorm is folded into its Linear layers and
  the p term of its first layer is applied to every centre vector once:
  centre_pb [K, HW, H1], gathered at the matched index when scoring. Equal to
  `score_features` up to float32 rounding.
  """
  folded = heads_lib.fold_discriminator(
      params["disc"], batch_stats["disc"], cfg.disc_layers, cfg.crd_input, cfg.embed_dim
  )
  b = folded.pop("b")
  centre_pb = None if b is None else heads_lib.matmul(centres, b, cfg.dtype).astype(jnp.float32)
  return {
      "adapter": params["adapter"],
      "disc": folded,
      "centres": centres,
      "centres_unit": matching.unit_centres(centres),
      "centre_pb": centre_pb,
  }


def score_prepared(
    prep: dict,
    t,
    grid: tuple[int, int],
    out_size: tuple[int, int],
    cfg: HeadsConfig,
    with_u: bool = False,
    axis_name: str | None = None,
):
  """`score_features` from `prepare_scoring`'s variables (the fast inference path).

  -> dict(scores [B], maps [B, H, W], patch [B, h, w], cls [B]) and, with `with_u`,
  the adapted features "u" [B, HW, D]. `axis_name`: per-device code's mesh axis (the batch
  mode of matching counts the whole batch's classes over it).
  """
  with jax.named_scope("adapter"):
    u = cfg.adapter.apply({"params": prep["adapter"]}, t)
  centres = prep["centres"]
  pb = None
  with jax.named_scope("matching"):
    k = matching.global_match(u, centres)
    if not cfg.per_image_matching:
      k = matching.batch_mode_class(k, centres.shape[0], axis_name)
    if prep["centre_pb"] is not None:
      hw = prep["centre_pb"].shape[1]
      if cfg.hpi:
        idx, _ = matching.match_known(
            u, centres, k, True, prep["centres_unit"], cfg.one_hot_classes
        )
      else:
        idx = jnp.broadcast_to(jnp.arange(hw), (u.shape[0], hw))
      pb = matching.matched_rows(prep["centre_pb"], k, idx)
  with jax.named_scope("discriminator"):
    logits = heads_lib.apply_folded_discriminator(prep["disc"], u, pb, cfg.dtype)
  with jax.named_scope("anomaly_map"):
    patch = jax.nn.sigmoid(logits).reshape(u.shape[0], *grid)
    maps = amap.anomaly_map(patch, out_size, cfg.map_sigma)
  out = {
      "scores": amap.image_score(patch, maps, cfg.score_mode),
      "maps": maps,
      "patch": patch,
      "cls": k,
  }
  if with_u:
    out["u"] = u
  return out
