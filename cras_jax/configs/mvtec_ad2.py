"""MVTec AD 2 (8 scenarios, read in its own layout: train/good, validation/good,
test_public/{good,bad}, masks test_public/ground_truth/bad/<name>_mask.png), multi-class, with
the paper's settings. Thresholds come from the validation split; test_public is evaluated with
SegF1 besides the usual metrics; `python -m cras_jax.submission` writes the server's format
(docs/mvtec_ad2.md)."""

from cras_jax.configs import mvtec


def get_config():
  return mvtec.for_dataset("mvtec_ad2")
