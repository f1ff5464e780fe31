"""The config schema: one place for defaults, choices and descriptions, read by the rest."""

import os

import pytest

from cras_jax.base import schema
from cras_jax.config import check as config_check
from cras_jax.configs import mvtec
from cras_jax.data import preprocess
from cras_jax.engine import model
from cras_jax.method import centres, loss, synthesis

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _leaves(d, prefix=""):
  for k, v in d.items():
    if isinstance(v, dict):
      yield from _leaves(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v


def test_default_config_has_exactly_the_schema_fields():
  leaves = list(_leaves(mvtec.get_config().to_dict()))
  assert sorted(n for n, _ in leaves) == sorted(f.name for f in schema.FIELDS)
  for name, value in leaves:
    if name != "data.classes":  # mvtec sets its 15 classes
      assert value == schema.default(name), name
  assert len(mvtec.get_config().data.classes) == 15


def test_every_default_is_one_of_its_choices():
  for f in schema.FIELDS:
    if f.choices is not None:
      assert f.default in f.choices, f.name
      assert len(set(f.choices)) == len(f.choices), f.name


def test_crd_choices_are_the_loss_table():
  assert schema.choices("model.crd_input") == tuple(loss.CRD_MODES)
  for mode in schema.choices("model.crd_input"):
    assert set(loss.crd_parts(mode)) <= {"raw", "residual"}


def test_stages_accept_exactly_the_schema_choices():
  assert centres.CENTRE_MODES == schema.choices("model.centre")
  assert synthesis.VARIANTS == schema.choices("model.dafs_variant")
  assert preprocess.MASK_RULES == schema.choices("data.mask_rule")
  assert tuple(model.DTYPES) == schema.choices("model.dtype")


def test_heads_defaults_are_the_default_configs():
  assert model.HeadsConfig() == model.HeadsConfig.from_config(mvtec.get_config().model)


@pytest.mark.parametrize("name", [f.name for f in schema.FIELDS if f.choices])
def test_config_check_refuses_a_value_outside_the_choices(name):
  config = mvtec.get_config()
  *parents, leaf = name.split(".")
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = "no_such_choice"
  problems = config_check.problems_of(config, check_files=False)
  assert problems == [
      f"{name}='no_such_choice': choose one of " + ", ".join(map(repr, schema.choices(name)))
  ]


def test_later_defaults_come_from_the_schema():
  assert schema.LATER_DEFAULTS == {
      "data.mask_rule": "binarise",
      "data.max_image_pixels": 50_000_000,
      "data.max_aspect_ratio": 10.0,
      "data.allow_crop_padding": False,
      "data.workers": 0,
      "data.on_device": "auto",  # where batches are gathered: results do not depend on it
      "data.sources": (),  # data.name=combined only
      "model.kernels": "auto",
      "model.aggregate_dtype": "float32",  # runs saved before the field aggregated in float32
      "train.deterministic": True,
      "train.population": "",
      "train.data_seed": -1,
      "train.member_data_order": "shared",  # runs saved before the field shared the order
      "train.population_model_shards": 1,
      "train.population_batching": "auto",
      "train.parallelism": "jit",  # runs saved before the field were jit-partitioned
      "data.data_dir": "",
      "data.download_url": "",
      "data.download_sha256": "",
      "model.weights_url": "",
      "cache.dir": "",
      "cache.compilation": "auto",
  }


def test_unknown_field_names_are_refused():
  with pytest.raises(KeyError, match="no config field"):
    schema.default("model.no_such_field")
  with pytest.raises(KeyError, match="no choice list"):
    schema.choices("model.embed_dim")


def test_committed_field_table_is_up_to_date():
  with open(os.path.join(ROOT, "docs", "config.md")) as f:
    committed = f.read()
  assert (
      committed == schema.markdown()
  ), "docs/config.md is stale: python -m cras_jax.base.schema > docs/config.md"
