"""Sizes and scales that would exhaust the machine are refused by the config check."""

import math

import pytest

from cras_jax.config import bounds as config_bounds
from cras_jax.config import check as config_check
from cras_jax.configs import btad, demo, folder, itdd, mpdd, mvtec, visa


@pytest.mark.parametrize(
    "field, value, said",
    [
        ("model.embed_dim", 200000, "from 1 to 16384"),
        ("model.embed_dim", 2000000000, "from 1 to 16384"),
        ("model.map_sigma", 1e8, "<= 256"),
        ("model.noise_sigma", math.inf, "finite"),
        ("model.noise_sigma", math.nan, "finite"),
        ("train.lr_adapter", 1e10, "<= 10"),
        ("train.lr_disc", -math.inf, "finite"),
        ("data.synthetic.image_size", 60000, "from 32 to 4096"),
        ("data.max_aspect_ratio", math.nan, "finite"),
        ("data.resize", 100000, "from 1 to 8192"),
        ("train.batch_size", 10**7, "from 1 to 65536"),
    ],
)
def test_oversized_or_non_finite_values_are_refused_with_the_field(field, value, said):
  cfg = demo.get_config()
  section, name = field.rsplit(".", 1)
  node = cfg
  for part in section.split("."):
    node = node[part]
  node[name] = value
  problems = [p for p in config_check.problems_of(cfg, check_files=False) if p.startswith(field)]
  assert any(said in q for q in problems), problems


@pytest.mark.parametrize("module", [mvtec, demo, folder, visa, mpdd, itdd, btad])
def test_shipped_configs_are_within_bounds(module):
  assert config_bounds.bound_problems(module.get_config()) == []


def test_step_memory_estimate_refuses_what_the_device_cannot_hold():
  cfg = mvtec.get_config()
  need = config_bounds.step_memory_bytes(cfg, 15)
  assert config_bounds.memory_problem(cfg, 15, (need + 1, "test memory")) is None
  why = config_bounds.memory_problem(cfg, 15, (2**30, "test memory"))
  assert why and "test memory is 1.0 GiB" in why and "lower train.batch_size" in why
  # The estimate grows with what the step holds.
  bigger = mvtec.get_config()
  bigger.train.batch_size *= 2
  assert config_bounds.step_memory_bytes(bigger, 15) > need
  bigger.model.embed_dim = 16384
  assert config_bounds.step_memory_bytes(bigger, 15) > 2**35  # > 32 GiB: no small machine


def test_check_refuses_a_step_larger_than_the_machine(monkeypatch):
  cfg = demo.get_config()
  monkeypatch.setattr(config_bounds, "available_memory", lambda: (2**20, "test memory"))
  with pytest.raises(config_check.ConfigError, match="test memory is 0.0 GiB"):
    config_check.check(cfg)


def test_scoring_memory_estimate_refuses_an_eval_batch_the_machine_cannot_hold(monkeypatch):
  cfg = demo.get_config()
  need = config_bounds.score_memory_bytes(cfg, 4)
  have = (max(need, config_bounds.step_memory_bytes(cfg, 4)) + 1, "test memory")
  assert config_bounds.memory_problem(cfg, 4, have) is None
  cfg.eval.batch_size = 65536
  why = config_bounds.memory_problem(cfg, 4, have)
  assert why.startswith("eval.batch_size=65536: a scoring step needs at least")
  assert "lower eval.batch_size" in why
  # predict's --batch_size goes through the same estimate, named as the flag
  cfg.eval.batch_size = 8
  why = config_bounds.scoring_memory_problem(cfg, 4, 65536, have, what="--batch_size")
  assert why.startswith("--batch_size=65536:") and "lower --batch_size" in why
  # on this machine too, before anything is prepared
  monkeypatch.setattr(config_bounds, "available_memory", lambda: (8 * 2**30, "test memory"))
  cfg.eval.batch_size = 65536
  with pytest.raises(config_check.ConfigError, match="eval.batch_size=65536"):
    config_check.check(cfg)
