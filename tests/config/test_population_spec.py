"""A population's members: names that tell every value apart, repeated values refused, seeds
that are distinct random keys; all checked with the config, before any work."""

import jax
import pytest

from cras_jax.config import check as config_check
from cras_jax.config import population
from cras_jax.configs import demo


def _problems(spec, **fields):
  cfg = demo.get_config()
  cfg.train.population = spec
  for dotted, v in fields.items():
    node, *path = dotted.split("__")
    target = cfg[node]
    for part in path[:-1]:
      target = target[part]
    if path:
      target[path[-1]] = v
    else:
      cfg[node] = v
  return config_check.problems_of(cfg, check_files=False)


@pytest.mark.parametrize(
    "a,b",
    [(0.1, 0.1000001), (1e-5, 1.00000001e-5), (0.3, 0.1 + 0.2), (2.0, 2.0000000000000004)],
)
def test_member_names_tell_values_that_print_alike_apart(a, b):
  names = [population.member_name({"model.noise_sigma": v}) for v in (a, b)]
  assert names[0] != names[1]
  for v, name in zip((a, b), names):  # the name reads back as the value
    assert float(name.removeprefix("noise_sigma")) == v


def test_member_names_keep_their_short_form_where_it_is_exact():
  values = {"seed": 3, "model.noise_sigma": 0.2, "model.dafs_beta": 1e-05}
  assert population.member_name(values) == "seed3_noise_sigma0.2_dafs_beta1e-05"


@pytest.mark.parametrize(
    "spec", ["model.noise_sigma=1,1.0", "seed=2,2", "model.noise_sigma=0.5,5e-1"]
)
def test_a_value_given_twice_is_refused(spec):
  (problem,) = _problems(spec)
  assert "are the same value" in problem and "give each value once" in problem


@pytest.mark.parametrize("seed", [-1, 2**32, 2**40, True])
def test_a_seed_that_would_give_another_seeds_key_is_refused(seed):
  (problem,) = _problems(f"seed=0,{seed}")
  assert f"seed={seed!r}: must be an integer from 0 to {2**32 - 1}" in problem
  (problem,) = _problems("", seed=seed)
  assert problem.startswith(f"seed={seed!r}: must be an integer from 0")


def test_the_seed_range_is_the_range_of_distinct_keys():
  """Why the bound is 2**32: beyond it (and for -1, and True) JAX gives another seed's key."""
  key = lambda s: jax.random.key_data(jax.random.PRNGKey(s)).tolist()
  assert key(2**32) == key(0) and key(2**40) == key(0) and key(True) == key(1)
  assert key(-1) == key(config_check.SEED_END - 1)
  assert len({tuple(key(s)) for s in (0, 1, 2**31, 2**32 - 1)}) == 4
  assert _problems("", seed=2**32 - 1) == [] and _problems("", train__data_seed=-1) == []
  (problem,) = _problems("", train__data_seed=-2)
  assert problem.startswith("train.data_seed=-2: must be an integer from -1")
