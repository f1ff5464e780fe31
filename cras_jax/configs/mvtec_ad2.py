"""MVTec AD 2 (8 scenarios, read in its own layout: train/good, validation/good,
test_public/{good,bad}, masks test_public/ground_truth/bad/<name>_mask.png), multi-class, with
the paper's settings. Thresholds come from the validation split; test_public is evaluated with
SegF1 besides the usual metrics; `python -m cras_jax.submission` writes the server's format
(docs/mvtec_ad2.md)."""

from cras_jax.base import registry
from cras_jax.configs import mvtec

MVTEC_AD2_CLASSES = registry.MVTEC_AD2_CLASSES  # the registry's list (one table)


def get_config():
  config = mvtec.get_config()
  config.data.name = "mvtec_ad2"
  config.data.classes = MVTEC_AD2_CLASSES
  return config
