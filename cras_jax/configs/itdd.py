"""ITDD (4 classes of industrial textiles), multi-class."""

from cras_jax.configs import mvtec


def get_config():
  return mvtec.for_dataset("itdd")
