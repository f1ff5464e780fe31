"""ITDD (4 classes of industrial textiles), multi-class."""

from cras_jax.configs import mvtec

ITDD_CLASSES = ("cotton_fabric", "dyed_fabric", "hemp_fabric", "plaid_fabric")


def get_config():
  config = mvtec.get_config()
  config.data.name = "itdd"
  config.data.classes = ITDD_CLASSES
  return config
