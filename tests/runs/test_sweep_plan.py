"""`--seeds`: a multi-class run becomes one population, other runs separate seeded runs grouped
for the report."""

from cras_jax.runs import sweep_plan


def test_with_seeds_makes_populations_where_allowed():
  runs = {
      "full": [],
      "sigma": ["--config.train.population=model.noise_sigma=0.1,0.2"],
      "seeded": ["--config.train.population=seed=5,6"],
      "per_class": ["--config.setting=single_class"],
  }
  out, groups = sweep_plan.with_seeds(runs, 3, "configs/demo.py", ["--config.seed=4"])
  assert out["full"] == ["--config.train.population=seed=4,5,6"]
  assert out["sigma"][-1] == "--config.train.population=model.noise_sigma=0.1,0.2;seed=4,5,6"
  for name, base in (("seeded", runs["seeded"]), ("per_class", runs["per_class"])):
    assert name not in out
    for s in (4, 5, 6):
      sub = f"{name}_seed{s}"
      assert out[sub] == [*base, f"--config.seed={s}", "--config.train.data_seed=4"]
      assert groups[sub] == name
  assert groups["full"] == "full"
  assert sweep_plan.with_seeds(runs, 1, "configs/demo.py", []) == (runs, {})
