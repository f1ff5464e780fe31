"""BTAD (beanTech, 3 products), multi-class, read in its own layout (train/ok, test/ok,
test/ko, ground_truth/ko/<name>.png|bmp; ok is read as good)."""

from cras_jax.configs import mvtec


def get_config():
  return mvtec.for_dataset("btad")
