"""MPDD (6 classes of metal parts), multi-class."""

from cras_jax.configs import mvtec

MPDD_CLASSES = (
    "bracket_black",
    "bracket_brown",
    "bracket_white",
    "connector",
    "metal_plate",
    "tubes",
)


def get_config():
  config = mvtec.get_config()
  config.data.name = "mpdd"
  config.data.classes = MPDD_CLASSES
  return config
