"""MPDD (6 classes of metal parts), multi-class."""

from cras_jax.base import registry
from cras_jax.configs import mvtec

MPDD_CLASSES = registry.MPDD_CLASSES  # the registry's list (one table)


def get_config():
  config = mvtec.get_config()
  config.data.name = "mpdd"
  config.data.classes = MPDD_CLASSES
  return config
