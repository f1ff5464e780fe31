"""MPDD (6 classes of metal parts), multi-class."""

from cras_jax.configs import mvtec


def get_config():
  return mvtec.for_dataset("mpdd")
