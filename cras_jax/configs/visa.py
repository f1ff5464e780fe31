"""VisA (12 classes, converted to the MVTec layout), multi-class."""

from cras_jax.configs import mvtec


def get_config():
  return mvtec.for_dataset("visa")
