"""TPU steps compiled on this host without a TPU (cras_jax/perf/tpu.py): topology shapes, the
batch-limit search, and a tiny model compiled by libtpu for 4 v5e chips. The libtpu tests are
skipped, with the reason, where libtpu is not installed (requirements-tpu-compile.txt)."""

import importlib.util

import jax
import numpy as np
import pytest

from cras_jax.base import errors
from cras_jax.engine import steps
from cras_jax.perf import rows, scaling_report, systems, target_study, tpu
from tests import tiny_step

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install -r requirements-tpu-compile.txt)",
)
NUM_CLASSES = 3


@pytest.mark.parametrize(
    "generation, chips, name, bounds",
    [
        ("v5e", 1, "v5e:1x1", (1, 1, 1)),
        ("v5e", 2, "v5e:2x1", (2, 1, 1)),
        ("v5e", 4, "v5e:2x2", None),
        ("v5e", 8, "v5e:2x4", None),
        ("v5e", 256, "v5e:16x16", None),
        ("v6e", 16, "v6e:4x4", None),
        ("v4", 1, "v4:1x1x1", (1, 1, 1)),
        ("v4", 4, "v4:2x2x1", None),
        ("v4", 16, "v4:2x2x4", None),
        ("v5p", 64, "v5p:4x4x4", None),
        ("tpu7x", 8, "tpu7x:2x2x2", None),
    ],
)
def test_topology_shape_per_generation_and_chip_count(generation, chips, name, bounds):
  got_name, kwargs = tpu.topology_shape(generation, chips)
  assert got_name == name
  assert kwargs.get("chips_per_host_bounds") == bounds


def test_topology_refuses_chip_counts_that_are_not_powers_of_two_and_unknown_targets():
  with pytest.raises(errors.UserError, match="powers of two"):
    tpu.topology_shape("v5e", 6)
  with pytest.raises(errors.UserError, match="tpu:<generation>"):
    tpu.parse_target("tpu:v7")
  assert tpu.parse_target("cpu") is None and tpu.parse_target("tpu:v5e") == "v5e"


def test_largest_fitting_batch_is_the_brute_force_answer_and_grows_with_the_budget():
  footprint = lambda b: 1000 + 37 * b + (b // 5) * 11  # non-decreasing, with steps
  calls = []

  def counted(b):
    calls.append(b)
    return footprint(b)

  previous = 0
  for budget in range(900, 6000, 97):
    calls.clear()
    got = tpu.largest_fitting(counted, budget, limit=100)
    want = max([b for b in range(1, 101) if footprint(b) <= budget], default=0)
    assert got == want, budget
    assert got >= previous  # a larger budget never gives a smaller batch
    assert len(calls) <= 2 * 7 + 1  # doubling, then bisection
    previous = got
  assert tpu.largest_fitting(footprint, 10**9, limit=100) == 100


def test_largest_fitting_batch_grows_with_the_budget_even_where_memory_is_not_monotone():
  rng = np.random.default_rng(0)
  table = rng.integers(100, 1000, size=65)  # memory that jumps up and down with the batch
  footprint = lambda b: int(table[b])
  previous = 0
  for budget in range(50, 1100, 7):
    got = tpu.largest_fitting(footprint, budget, limit=64)
    assert got >= previous and (got == 0 or footprint(got) <= budget)
    previous = got


# ----------------------------------------------------------------------------- libtpu


def _size(hlo_shape: str) -> int:
  return int(np.prod([int(d) for d in hlo_shape[hlo_shape.index("[") + 1 : -1].split(",") if d]))


@pytest.fixture(scope="module")
def v5e_four_chips():
  config = tiny_step.compile_config()
  facts = tpu.compile_for_chips("train_cached", config, "v5e", 4, 2, NUM_CLASSES)
  return config, facts


@needs_libtpu
def test_gradients_are_all_reduced_once_on_four_v5e_chips(v5e_four_chips):
  config, facts = v5e_four_chips
  assert facts["topology"] == "v5e:2x2" and facts["devices_per_chip"] == 1
  spec = steps.ModelSpec(config, NUM_CLASSES)
  state = jax.eval_shape(lambda: steps._initial_state(spec, 0))
  grads = [x.size for x in jax.tree.leaves(state.params)]
  grad_bytes = sum(4 * x.size for x in jax.tree.leaves(state.params))
  reduces = [c for c in facts["collective_list"] if c["kind"] == "all-reduce"]
  assert all(c["group_size"] == 4 for c in reduces)
  # XLA combines every gradient leaf into one all-reduce; its arrays (the loss's scalars
  # aside) are the gradient tree (a leaf may travel reshaped, f32[16,1] as f32[16], or in
  # parts: elements are counted)
  (combined,) = [c for c in reduces if len(c["result_shapes"]) > 4]
  assert all(s.startswith("f32[") for s in combined["result_shapes"])
  arrays = [_size(s) for s in combined["result_shapes"] if s != "f32[]"]
  assert sum(arrays) == sum(grads) and max(arrays) <= max(grads)
  scalars = 4 * combined["result_shapes"].count("f32[]")
  assert combined["operand_bytes"] - scalars == grad_bytes
  # the other all-reduces are the BatchNorm statistics' sums (vectors no longer than a
  # statistic) and scalars: small next to the gradients
  rest = [c for c in reduces if c is not combined]
  longest_stat = max(x.size for x in jax.tree.leaves(state.batch_stats))
  assert all(_size(s) <= longest_stat for c in rest for s in c["result_shapes"])
  assert sum(c["operand_bytes"] for c in rest) <= grad_bytes / 2


@needs_libtpu
def test_tpu_memory_and_cost_analysis_are_positive(v5e_four_chips):
  _, facts = v5e_four_chips
  mem = facts["memory"]
  assert mem["argument_bytes"] > 0 and mem["output_bytes"] > 0 and mem["footprint_bytes"] > 0
  assert facts["flops"] > 0 and facts["bytes_accessed"] > 0
  per_chip = tpu.per_chip(facts)
  assert per_chip["footprint_bytes"] == mem["footprint_bytes"]  # one device per v5e chip


@needs_libtpu
def test_v4_topology_has_two_devices_per_chip_and_per_chip_figures_sum_them():
  config = tiny_step.compile_config()
  facts = tpu.compile_for_chips("train_cached", config, "v4", 1, 2, NUM_CLASSES)
  assert facts["devices_per_chip"] == 2 and facts["batch_per_device"] == 1
  assert tpu.per_chip(facts)["flops"] == 2 * facts["flops"]
  with pytest.raises(errors.UserError, match="multiple"):
    tpu.compile_for_chips("train_cached", config, "v4", 1, 3, NUM_CLASSES)


@needs_libtpu
@pytest.mark.slow
def test_batch_limit_never_shrinks_when_the_hbm_budget_grows():
  config = tiny_step.compile_config()
  devs, _, _ = tpu.topology_devices("v5e", 4)
  footprint = tpu.footprint_search("train_cached", config, devs, NUM_CLASSES, multiple=4)
  sizes = [footprint(k) for k in (1, 2, 4, 8)]
  previous = 0
  for budget in np.linspace(min(sizes) * 0.99, max(sizes) * 1.01, 7):
    got = tpu.largest_fitting(footprint, float(budget), limit=8)
    assert got >= previous, budget
    assert got == 0 or footprint(got) <= budget
    previous = got
  assert previous == 8 and len(footprint.cache) <= 8


def test_study_from_four_chips_projects_and_plots_without_efficiency(tmp_path):
  facts = {
      "flops": 1e12, "bytes_accessed": 1e10, "memory": {"footprint_bytes": 2e9},
      "collective_list": [{"kind": "all-reduce", "operand_bytes": 2e7, "group_size": 4}],
      "devices_per_chip": 1,
  }  # fmt: skip
  plan = [("weak b32/device", 4, 128), ("weak b32/device", 16, 512)]
  compiled = [
      {"mode": "train", "devices": n, "chips": n, "global_batch": g, "facts": facts}
      for _, n, g in plan
  ]
  ps = target_study.project(compiled, plan, systems.TPU_V5E, "bfloat16", None)
  assert [p["devices"] for p in ps] == [4, 16] and all(p["system"] == "TPU v5e" for p in ps)
  assert all(p["efficiency"] is None for p in ps)  # no 1-chip row to compare with
  assert ps[1]["images_per_s"] > 3.9 * ps[0]["images_per_s"]  # same per-chip step
  result = {"projections": ps, "config": "c", "model": "m"}
  scaling_report.plot(result, str(tmp_path / "scaling.png"))
  assert (tmp_path / "scaling.png").stat().st_size > 0


def test_a_batch_the_compiler_refuses_for_memory_does_not_fit(monkeypatch):
  """libtpu refuses to compile a step larger than the HBM (RESOURCE_EXHAUSTED,
  CompileTimeHbmOom) instead of reporting its footprint: the search counts that batch as not
  fitting; any other compile error still propagates."""

  def fake_compile(mode, config, devs, batch, num_classes):
    per_device = batch // len(devs)
    if per_device > 40:
      raise RuntimeError(
          "RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total "
          "memory required for HLO temporaries (23.38G) exceeds available HBM (15.75G)."
      )
    return {"memory": {"footprint_bytes": 1e5 * per_device}}

  monkeypatch.setattr(rows, "compile_step", fake_compile)
  got = tpu.max_batch_per_chip("train", None, [object()], 1, 1e12, 3, multiple=8)
  assert got["max_batch_per_chip"] == 40 and not got["at_limit"]

  def broken(mode, config, devs, batch, num_classes):
    raise RuntimeError("INTERNAL: something else")

  monkeypatch.setattr(rows, "compile_step", broken)
  with pytest.raises(RuntimeError, match="something else"):
    tpu.max_batch_per_chip("train", None, [object()], 1, 1e12, 3, multiple=8)


def test_max_batch_per_chip_searches_per_device_multiples_and_reports_the_limit(monkeypatch):
  compiled = []

  def fake_compile(mode, config, devs, batch, num_classes):
    compiled.append(batch)
    per_device = batch // len(devs)
    return {"memory": {"footprint_bytes": 1e6 + 1e5 * per_device}}

  monkeypatch.setattr(rows, "compile_step", fake_compile)
  devs = [object()] * 8  # 4 chips of 2 devices
  # per device: 1e6 + 1e5 b <= 8e6 / 2 -> b <= 30 -> 24 in multiples of 8 -> 48 per chip
  got = tpu.max_batch_per_chip("train", None, devs, 2, 8e6, 3, multiple=8)
  assert got["max_batch_per_chip"] == 48 and not got["at_limit"]
  assert got["footprint_per_chip_bytes"] == 2 * (1e6 + 1e5 * 24)
  assert all(b % (8 * 8) == 0 for b in compiled) and got["compiles"] == len(set(compiled))
  big = tpu.max_batch_per_chip("train", None, devs, 2, 1e12, 3, multiple=8, limit_per_chip=64)
  assert big["max_batch_per_chip"] == 64 and big["at_limit"]


def test_resident_table_adds_the_training_set_per_chip_to_the_steps_footprint():
  """data.on_device on a target: the training set split over the chips plus the compiled
  step, against the HBM (fits) and auto's margin (auto)."""
  from cras_jax.perf import target_study

  gb = 10**9
  feature = 1296 * 1536 * 2  # one WRN50-2 image's stored features, float16
  result = {
      "target": "tpu:v5e",
      "train_images": 3629,
      "host_feeds": {"train_cached": {"bytes_per_image": feature + 4}},
      "projections": [
          {"mode": "train_cached", "devices": n, "global_batch": 32 * n, "fits": True,
           "memory_needed_bytes": 2 * gb, "memory_available_bytes": 16 * gb}
          for n in (1, 4, 16)
      ] + [{"mode": "score", "devices": 1, "global_batch": 32, "fits": True,
            "memory_needed_bytes": gb, "memory_available_bytes": 16 * gb}],
  }  # fmt: skip
  rows = target_study.resident_rows(result)
  assert [r["chips"] for r in rows] == [1, 4, 16]  # scoring has no training set
  assert [r["data_bytes"] for r in rows] == [3629 * feature, 908 * feature, 227 * feature]
  assert [r["fits"] for r in rows] == [False, True, True]  # 14.4 + 2 GB > 16 GB
  assert [r["auto"] for r in rows] == [False, True, True]
  table = "\n".join(target_study.resident_table(result))
  assert "3,629 images" in table and "| train_cached | 4 | 128 |" in table
