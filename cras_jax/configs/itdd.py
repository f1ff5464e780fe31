"""ITDD (4 classes of industrial textiles), multi-class."""

from cras_jax.base import registry
from cras_jax.configs import mvtec

ITDD_CLASSES = registry.ITDD_CLASSES  # the registry's list (one table)


def get_config():
  config = mvtec.get_config()
  config.data.name = "itdd"
  config.data.classes = ITDD_CLASSES
  return config
