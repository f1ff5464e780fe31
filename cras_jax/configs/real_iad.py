"""Real-IAD (30 categories x 5 views, read as released through its JSON split files
realiad_jsons/realiad_jsons/<category>.json; every view an image of its category), multi-class,
with the paper's settings (docs/real_iad.md)."""

from cras_jax.configs import mvtec


def get_config():
  return mvtec.for_dataset("real_iad")
