"""`--seeds`: a multi-class run becomes one population, other runs separate seeded runs grouped
for the report."""

import re

import pytest

from cras_jax.base import errors
from cras_jax.experiments import sweep_plan


def test_with_seeds_makes_populations_where_allowed():
  runs = {
      "full": [],
      "sigma": ["--config.train.population=model.noise_sigma=0.1,0.2"],
      "seeded": ["--config.train.population=seed=5,6"],
      "per_class": ["--config.setting=single_class"],
      "pmap": ["--config.train.parallelism=pmap"],  # populations train with jit only
  }
  common = ["--config.seed=4", "--config.train.member_data_order=shared"]
  out, groups = sweep_plan.with_seeds(runs, 3, "configs/demo.py", common)
  assert out["full"] == ["--config.train.population=seed=4,5,6"]
  assert out["sigma"][-1] == "--config.train.population=model.noise_sigma=0.1,0.2;seed=4,5,6"
  for name, base in (
      ("seeded", runs["seeded"]),
      ("per_class", runs["per_class"]),
      ("pmap", runs["pmap"]),
  ):
    assert name not in out
    for s in (4, 5, 6):
      sub = f"{name}_seed{s}"
      assert out[sub] == [*base, f"--config.seed={s}", "--config.train.data_seed=4"]
      assert groups[sub] == name
  assert groups["full"] == "full"
  assert sweep_plan.with_seeds(runs, 1, "configs/demo.py", []) == (runs, {})


def test_seeded_runs_draw_their_own_data_order_where_a_population_would():
  """The demo trains on stored features: `train.member_data_order` "auto" is per member, so the
  separate seeded runs do not pin the data seed; a random backbone keeps the base seed."""
  runs = {"per_class": ["--config.setting=single_class"]}
  out, _ = sweep_plan.with_seeds(runs, 2, "configs/demo.py", ["--config.seed=4"])
  assert out == {
      "per_class_seed4": [*runs["per_class"], "--config.seed=4"],
      "per_class_seed5": [*runs["per_class"], "--config.seed=5"],
  }
  uncached = ["--config.train.cache_features=False"]
  out, _ = sweep_plan.with_seeds(runs, 2, "configs/demo.py", uncached)
  assert out["per_class_seed1"][-1] == "--config.train.data_seed=0"  # backbone in the step: shared
  random = ["--config.seed=4", "--config.model.weights=random"]
  out, _ = sweep_plan.with_seeds(runs, 2, "configs/demo.py", random)
  assert out["per_class_seed5"] == [
      *runs["per_class"],
      "--config.seed=5",
      "--config.train.data_seed=4",
      "--config.train.member_data_order=per_member",
  ]


@pytest.mark.parametrize(
    "returned,said",
    [
        ("['model.hpi=False']", "get_sweep() returned a list; return a dict of run name"),
        ("{'wo_hpi': 'model.hpi=False'}", "run 'wo_hpi': its overrides are a str; give a list"),
        ("{'wo_hpi': 3}", "run 'wo_hpi': its overrides are a int; give a list"),
        ("{'wo_hpi': ['model.hpi=False', 3]}", "run 'wo_hpi': override 3 is not text"),
    ],
)
def test_a_sweep_file_of_the_wrong_shape_names_the_run_and_the_fix(tmp_path, returned, said):
  path = tmp_path / "my_sweep.py"
  path.write_text(f"def get_sweep():\n  return {returned}\n")
  module = sweep_plan.load_sweep_module(str(path))
  with pytest.raises(errors.UserValueError, match=re.escape(said)) as e:
    sweep_plan.sweep_runs(module)
  assert str(path) in str(e.value)
