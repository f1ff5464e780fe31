"""VisA (12 classes, converted to the MVTec layout), multi-class."""

from cras_jax.configs import mvtec

VISA_CLASSES = (
    "candle",
    "capsules",
    "cashew",
    "chewinggum",
    "fryum",
    "macaroni1",
    "macaroni2",
    "pcb1",
    "pcb2",
    "pcb3",
    "pcb4",
    "pipe_fryum",
)


def get_config():
  config = mvtec.get_config()
  config.data.name = "visa"
  config.data.classes = VISA_CLASSES
  return config
