"""BTAD (beanTech, 3 products), multi-class, read in its own layout (train/ok, test/ok,
test/ko, ground_truth/ko/<name>.png|bmp; ok is read as good)."""

from cras_jax.base import registry
from cras_jax.configs import mvtec

BTAD_CLASSES = registry.BTAD_CLASSES  # the registry's list (one table)


def get_config():
  config = mvtec.get_config()
  config.data.name = "btad"
  config.data.classes = BTAD_CLASSES
  return config
