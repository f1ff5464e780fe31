"""VisA (12 classes, converted to the MVTec layout), multi-class."""

from cras_jax.base import registry
from cras_jax.configs import mvtec

VISA_CLASSES = registry.VISA_CLASSES  # the registry's list (one table)


def get_config():
  config = mvtec.get_config()
  config.data.name = "visa"
  config.data.classes = VISA_CLASSES
  return config
