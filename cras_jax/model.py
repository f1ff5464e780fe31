"""CRAS composed from its pure pieces: features -> adapter -> matching ->
DAFS -> discriminator -> loss (training) and -> anomaly map (scoring).

Nothing here knows about data loading, devices or checkpoints; `train.py`
jits and shards these functions.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from cras_jax import anomaly_map as amap
from cras_jax import features, loss as loss_lib, matching, synthesis
from cras_jax.heads import Adapter, Discriminator


@dataclasses.dataclass(frozen=True)
class HeadsConfig:
  """The static settings the heads need (a hashable view of config.model)."""
  embed_dim: int = 1536
  adapter_layers: int = 1
  disc_layers: int = 3
  noise_sigma: float = 0.015
  dafs_beta: float = 0.3
  dafs_variant: str = "default"
  crd_input: str = "raw_residual"
  hpi: bool = True
  per_image_matching: bool = True
  score_mode: str = "reference"
  map_sigma: float = 4.0
  dtype: Any = jnp.float32

  @classmethod
  def from_config(cls, model_cfg) -> "HeadsConfig":
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[model_cfg.dtype]
    return cls(embed_dim=model_cfg.embed_dim, adapter_layers=model_cfg.adapter_layers,
               disc_layers=model_cfg.disc_layers, noise_sigma=model_cfg.noise_sigma,
               dafs_beta=model_cfg.dafs_beta, dafs_variant=model_cfg.dafs_variant,
               crd_input=model_cfg.crd_input, hpi=model_cfg.hpi,
               per_image_matching=model_cfg.matching == "per_image",
               score_mode=model_cfg.score_mode, map_sigma=model_cfg.map_sigma, dtype=dtype)

  @property
  def adapter(self) -> Adapter:
    return Adapter(self.embed_dim, self.adapter_layers, dtype=self.dtype)

  @property
  def discriminator(self) -> Discriminator:
    return Discriminator(self.disc_layers, dtype=self.dtype)

  @property
  def disc_input_dim(self) -> int:
    return self.embed_dim * (1 if self.crd_input in ("raw", "residual") else 2)


def init_heads(cfg: HeadsConfig, rng: jax.Array):
  """Fresh adapter and discriminator variables -> (params, batch_stats)."""
  ra, rd = jax.random.split(rng)
  a = cfg.adapter.init(ra, jnp.zeros((1, cfg.embed_dim), jnp.float32))
  d = cfg.discriminator.init(rd, jnp.zeros((2, cfg.disc_input_dim), jnp.float32), train=False)
  return {"adapter": a["params"], "disc": d["params"]}, {"disc": d["batch_stats"]}


def make_embed_fn(backbone: Any, levels: tuple[int, ...], pre_embed_dim: int, embed_dim: int,
                  patch_size: int = 3) -> Callable:
  """Returns embed(backbone_vars, images_normalised) -> t [B, HW, D], (h, w)."""
  max_level = max(levels)

  def embed(backbone_vars, x):
    feats = backbone.apply(backbone_vars, x, max_level=max_level)
    maps = [feats[f"level{l}"].astype(jnp.float32) for l in levels]
    t = features.aggregate_patches(maps, pre_embed_dim, embed_dim, patch_size)
    return t, maps[0].shape[1:3]

  return embed


def heads_loss(params, batch_stats, t, labels, centres, noise, cfg: HeadsConfig):
  """One training forward pass on patch features t [B, HW, D].

  noise: g [B, HW, D], already scaled by sigma. Returns (loss, aux) where aux
  holds the new BatchNorm statistics and the step's metrics.
  """
  u = cfg.adapter.apply({"params": params["adapter"]}, t)
  _, p = matching.match_known(u, centres, labels, cfg.hpi)
  v = synthesis.dafs(u, p, noise, cfg.dafs_beta, cfg.dafs_variant)
  y = loss_lib.crd_inputs(u, p, cfg.crd_input)
  z = loss_lib.crd_inputs(v, p, cfg.crd_input)
  xin = jnp.concatenate([y, z], axis=0).reshape(-1, y.shape[-1])
  logits, new_vars = cfg.discriminator.apply(
      {"params": params["disc"], "batch_stats": batch_stats["disc"]}, xin, train=True,
      mutable=["batch_stats"])
  n = y.shape[0] * y.shape[1]
  lt, lf = logits[:n], logits[n:]
  loss_true, loss_fake = loss_lib.bce_losses(lt, lf)
  aux = {
      "batch_stats": {"disc": new_vars["batch_stats"]},
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


def score_features(params, batch_stats, t, centres, grid: tuple[int, int], out_size: tuple[int, int],
                   cfg: HeadsConfig):
  """Inference on patch features: -> dict(scores [B], maps [B, H, W], patch [B, h, w], cls [B])."""
  u = adapt(params, t, cfg)
  k, _, p = matching.match_infer(u, centres, cfg.hpi, cfg.per_image_matching)
  y = loss_lib.crd_inputs(u, p, cfg.crd_input)
  logits = cfg.discriminator.apply(
      {"params": params["disc"], "batch_stats": batch_stats["disc"]}, y, train=False)
  patch = jax.nn.sigmoid(logits).reshape(u.shape[0], *grid)
  maps = amap.anomaly_map(patch, out_size, cfg.map_sigma)
  return {"scores": amap.image_score(patch, maps, cfg.score_mode), "maps": maps,
          "patch": patch, "cls": k}
