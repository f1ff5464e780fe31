"""The small typed pieces of a config the lower layers take, built here once from the
`ConfigDict`: the data (`data_spec`), the feature cache (`cache_spec`), TensorBoard's switch
and the learning rates it logs. Data, the feature cache and the summaries never read a config.
"""

from __future__ import annotations

from cras_jax.base import user_cache
from cras_jax.config import population
from cras_jax.data import preprocess
from cras_jax.data.fetch import FetchSpec
from cras_jax.data.spec import DataSpec, SyntheticSpec
from cras_jax.runs import feature_cache


def limits(config) -> preprocess.Limits:
  """The largest image a file may declare (`data.max_image_pixels`, `data.max_aspect_ratio`)."""
  return preprocess.Limits(int(config.data.max_image_pixels), float(config.data.max_aspect_ratio))


def data_spec(config) -> DataSpec:
  d = config.data
  s = d.synthetic
  return DataSpec(
      name=d.name,
      root=d.root,
      classes=tuple(d.classes),
      cache_dir=d.cache_dir,
      resize=d.resize,
      crop=d.crop,
      allow_image_level_only=d.allow_image_level_only,
      mask_rule=d.mask_rule,
      limits=limits(config),
      synthetic=SyntheticSpec(
          s.seed, s.image_size, s.n_train, s.n_test_good, s.n_test_defect_per_type
      ),
      fetch=fetch_spec(config),
      sources=tuple(d.sources),
  )


def fetch_spec(config) -> FetchSpec:
  """The dataset as named (`data.name`, fetched when `data.root` is empty): where named
  datasets live and the archive address and hash that override the registry's."""
  d = config.data
  return FetchSpec(
      name=d.name,
      classes=tuple(d.classes),
      data_dir=user_cache.datasets_dir(config),
      download_url=str(d.download_url or ""),
      download_sha256=str(d.download_sha256 or ""),
  )


def cache_spec(config) -> feature_cache.CacheSpec:
  m = config.model
  return feature_cache.CacheSpec(
      backbone=m.backbone,
      weights=m.weights,
      seed=population.backbone_seed(config),
      levels=tuple(m.levels),
      patch_size=m.patch_size,
      pre_embed_dim=m.pre_embed_dim,
      embed_dim=m.embed_dim,
      compute_dtype=m.dtype,
      storage_dtype=config.train.feature_cache_dtype,
      folder=config.train.feature_cache_dir,
  )


def tensorboard(config) -> bool:
  """`log.tensorboard` (on for configs saved before it existed: `schema.filled`)."""
  return bool(config.log.tensorboard)


def learning_rates(config) -> dict[str, float]:
  """The constant learning rates TensorBoard shows beside the training metrics."""
  return {"adapter": config.train.lr_adapter, "disc": config.train.lr_disc}
