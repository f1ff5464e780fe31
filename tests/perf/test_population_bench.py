"""The population throughput tool: rows for both forms and every size, the speed-up and the
whole-run ratio computed from the measured times, and its flags checked."""

import pytest

from cras_jax import population_bench as command
from cras_jax.base import errors
from cras_jax.configs import demo
from cras_jax.perf import population_bench as bench


@pytest.mark.slow
def test_rows_for_both_forms_and_ratios_from_their_times(monkeypatch):
  monkeypatch.setitem(bench.SETUPS, "tiny", (demo.get_config, "efficientnet_lite0", 64))
  rows = bench.measure("tiny", [1, 2], "features", n=1, batch_size=4)
  assert [(r["batching"], r["size"]) for r in rows] == [
      ("map", 1),
      ("map", 2),
      ("vmap", 1),
      ("vmap", 2),
  ]
  for r in rows:
    assert r["step_s"] > 0 and r["single_step_s"] > 0
    assert r["speedup"] == pytest.approx(r["size"] * r["single_step_s"] / r["step_s"])
    assert r["images_models_per_s"] == pytest.approx(r["size"] * 4 / r["step_s"])
    if r["batching"] == "map":  # nothing compiled beyond the single-run step
      assert r["compile_s"] == r["single_compile_s"]
  ratio = bench.run_ratio(rows, steps_per_run=10, size=2, batching="map")
  r = rows[1]
  assert ratio["separate_s"] == pytest.approx(2 * (r["single_compile_s"] + 10 * r["single_step_s"]))
  assert ratio["population_s"] == pytest.approx(r["compile_s"] + 10 * r["step_s"])
  assert bench.run_ratio(rows, 10, size=8) is None
  assert "| tiny | stored features | vmap | 2 |" in bench.markdown_row(rows[3])


def test_unknown_batching_is_a_usage_error():
  from absl import flags

  fv = flags.FlagValues()
  command.define_flags(fv)
  fv(["population_bench", "--batchings=loop"])
  with pytest.raises(errors.UserValueError, match="unknown setup, mode or batching loop"):
    command.main(["population_bench"], fv)
