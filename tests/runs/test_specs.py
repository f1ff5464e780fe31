"""The typed pieces of a config handed to data, the feature cache and the summaries."""

import dataclasses
import types

import pytest

from cras_jax import data as data_lib
from cras_jax.configs import demo, mvtec
from cras_jax.data import preprocess
from cras_jax.runs import feature_cache, specs
from cras_jax.runs import workdir as runs

DATASET = types.SimpleNamespace(
    builder=types.SimpleNamespace(builder_config=types.SimpleNamespace(name="mvtec_folder_x"))
)


def test_data_spec_carries_the_config_fields():
  c = demo.get_config()
  c.data.cache_dir = "/cache"
  s = specs.data_spec(c)
  assert (s.name, s.root, s.classes, s.resize, s.crop) == ("synthetic", "", (), 160, 160)
  assert s.synthetic.n_train == 60 and s.synthetic.image_size == 160
  assert s.limits == preprocess.Limits(50_000_000, 10.0) and s.mask_rule == "binarise"
  assert data_lib.cache_dir(s, "/w") == "/cache"
  assert data_lib.cache_dir(dataclasses.replace(s, cache_dir=""), "/w") == "/w/data_cache"
  with pytest.raises(dataclasses.FrozenInstanceError):
    s.crop = 1  # frozen: built once, read everywhere


def test_a_config_saved_before_the_later_fields_gets_their_defaults():
  d = mvtec.get_config().to_dict()
  for k in ("mask_rule", "max_image_pixels", "max_aspect_ratio", "allow_crop_padding"):
    del d["data"][k]
  del d["log"]
  old = runs.config_from_meta({"config": d})  # as a run's stored config is read
  s = specs.data_spec(old)
  assert s.mask_rule == "binarise" and s.limits == preprocess.Limits()
  assert specs.tensorboard(old) is True
  old_off = mvtec.get_config()
  old_off.log.tensorboard = False
  assert specs.tensorboard(old_off) is False


def test_cache_key_follows_what_determines_the_features_not_the_folder():
  c = mvtec.get_config()
  c.model.weights = "random"
  s = specs.cache_spec(c)
  k = feature_cache.key(s, DATASET)
  assert feature_cache.key(dataclasses.replace(s, folder="/elsewhere"), DATASET) == k
  for change in (
      {"embed_dim": 8},
      {"levels": (1, 2)},
      {"storage_dtype": "float32"},
      {"compute_dtype": "bfloat16"},
      {"seed": 1},  # random weights: the seed draws them
  ):
    assert feature_cache.key(dataclasses.replace(s, **change), DATASET) != k, change
  assert feature_cache.path(s, "/d", k) == f"/d/features/train_{k}.npy"
  assert feature_cache.path(dataclasses.replace(s, folder="/f"), "/d", k) == f"/f/train_{k}.npy"


def test_learning_rates_are_the_configs():
  c = mvtec.get_config()
  assert specs.learning_rates(c) == {"adapter": 1e-4, "disc": 2e-4}
