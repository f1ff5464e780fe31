"""NVIDIA GPU steps compiled on this host without a GPU (cras_jax/perf/gpu.py, targets.py,
target_study.py): topology names, the shipped target configs, and a tiny model compiled by
JAX's CUDA plugin for 2 H100s. The plugin tests are skipped, with the reason, where the plugin
is not installed (requirements-gpu-compile.txt)."""

import dataclasses
import json
import os
import tomllib

import jax
import pytest

from cras_jax.base import errors
from cras_jax.configs import mvtec
from cras_jax.engine import steps
from cras_jax.perf import gpu, rows, scaling, systems, targets, tpu
from tests import tiny_step
from tests.conftest import ROOT, run_command

needs_cuda_plugin = pytest.mark.skipif(
    not gpu.plugin_installed(),
    reason="JAX's CUDA plugin is not installed (pip install -r requirements-gpu-compile.txt)",
)
NUM_CLASSES = 3
TINY = ("--config=configs/demo.py", "--image_size=64", "--embed_dim=32", "--pre_embed_dim=48")


@pytest.mark.parametrize(
    "count, name", [(1, "1x1x1"), (2, "1x1x2"), (8, "1x1x8"), (16, "1x2x8"), (64, "1x8x8")]
)
def test_gpu_topologies_are_hosts_of_eight(count, name):
  assert gpu.topology_name(count) == name


def test_gpu_targets_parse_and_refuse_unknown_kinds_and_counts():
  assert targets.parse("gpu:h100") == targets.Target("gpu", "h100")
  assert targets.parse("gpu:h200").chip is systems.H200
  assert targets.parse("tpu:v5e").chip is systems.TPU_V5E
  assert targets.parse("cpu") is None
  with pytest.raises(errors.UserError, match="gpu:<kind>"):
    targets.parse("gpu:a100")
  with pytest.raises(errors.UserError, match="multiples of 8"):
    gpu.topology_name(12)
  with pytest.raises(errors.UserError, match="cpu' or 'tpu:<generation>"):
    gpu.cost_devices("gpu:h100")


def _fields(text: str) -> dict[str, str]:
  pairs = (line.strip().split(": ", 1) for line in text.splitlines())
  return {p[0]: p[1] for p in pairs if len(p) == 2 and not p[0].startswith("#")}


def test_h200_config_is_the_h100_one_with_the_h200_memory():
  h100, h200 = (_fields(gpu.target_config(k)) for k in ("h100", "h200"))
  differ = {k for k in h100 if h100[k] != h200[k]}
  assert differ == {"memory_bandwidth", "device_memory_size", "device_description_str"}
  assert int(h200["memory_bandwidth"]) == 4.8e12
  assert int(h200["device_memory_size"]) == 141 * 2**30


def test_target_configs_are_package_data():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    data = tomllib.load(f)["tool"]["setuptools"]["package-data"]
  assert "gpu_targets/*.txtpb" in data["cras_jax.perf"]
  for name in gpu.KINDS.values():
    assert os.path.exists(os.path.join(ROOT, "cras_jax", "perf", "gpu_targets", name))


def test_missing_plugin_names_the_requirements_file(monkeypatch):
  monkeypatch.setattr(gpu, "plugin_installed", lambda: False)
  with pytest.raises(errors.UserError, match="requirements-gpu-compile.txt"):
    gpu.topology_devices("h100", 2)


# ----------------------------------------------------------------------------- the plugin


@pytest.fixture(scope="module")
def two_h100s():
  config = tiny_step.compile_config()
  devs, name, per_gpu = gpu.topology_devices("h100", 2)
  facts = rows.compile_step("train_cached", config, devs, 4, NUM_CLASSES)
  return config, devs, name, per_gpu, facts


@needs_cuda_plugin
def test_gradients_are_all_reduced_on_two_h100s(two_h100s):
  config, devs, name, per_gpu, facts = two_h100s
  assert name == "h100:1x1x2" and per_gpu == 1
  assert [d.device_kind for d in devs] == ["NVIDIA H100 80GB HBM3"] * 2
  spec = steps.ModelSpec(config, NUM_CLASSES)
  state = jax.eval_shape(lambda: steps._initial_state(spec, 0))
  grad_bytes = sum(4 * x.size for x in jax.tree.leaves(state.params))
  reduces = [c for c in facts["collective_list"] if c["kind"] == "all-reduce"]
  assert reduces and all(c["group_size"] == 2 for c in reduces)
  assert set(facts["collectives"]) == {"all-reduce"}  # rows stay on their GPU
  # every gradient once, and beyond them only the BatchNorm and DAFS statistics and the
  # loss's metrics: a few KB
  total = facts["collectives"]["all-reduce"]["operand_bytes"]
  assert grad_bytes <= total < grad_bytes + 4096, (grad_bytes, total)


@needs_cuda_plugin
def test_gpu_memory_analysis_is_positive_and_cost_comes_from_the_cpu(two_h100s):
  config, devs, _, _, facts = two_h100s
  mem = facts["memory"]
  assert mem["argument_bytes"] > 0 and mem["output_bytes"] > 0 and mem["footprint_bytes"] > 0
  assert facts["flops"] is None and facts["bytes_accessed"] is None  # the GPU compiler's
  # the XLA:CPU compile of the same step, in the same process as the GPU topology
  cost = gpu.borrowed_cost("cpu", config, NUM_CLASSES)
  got = cost("train_cached", 2)
  assert got["flops"] > 0 and got["bytes_accessed"] > 0
  assert got["cost_source"] == "XLA:CPU cost analysis"
  assert cost("train_cached", 2) is got  # compiled once per (mode, batch per device)
  assert jax.devices()[0].platform == "cpu"  # the tool's own devices are untouched


@needs_cuda_plugin
@pytest.mark.skipif(tpu.libtpu_version() is None, reason="libtpu is not installed")
@pytest.mark.slow
def test_gpu_cost_from_a_tpu_chip_names_libtpu():
  cost = gpu.borrowed_cost("tpu:v5e", tiny_step.compile_config(), NUM_CLASSES)
  got = cost("train_cached", 2)
  assert got["flops"] > 0 and got["cost_source"].startswith("libtpu ")


@needs_cuda_plugin
@pytest.mark.slow
def test_gpu_study_command_writes_the_tables_and_searches_the_batch_limit(tmp_path, monkeypatch):
  # GPUs of 1 MB for --max_batch: the first probe (8 images per GPU) does not fit, so one
  # compile answers 0 (tests/perf/test_tpu.py tests the search itself)
  tiny_gpu = dataclasses.replace(systems.H100_SXM, memory_per_device_bytes=1e6)
  monkeypatch.setitem(systems.GPU_CHIPS, "h100", tiny_gpu)
  out = tmp_path / "h100"
  result = run_command(
      scaling, *TINY, "--num_classes=3", "--target=gpu:h100", "--devices=2",
      "--batch_per_device=2", "--modes=train_cached", "--max_batch", f"--out={out}",
  )  # fmt: skip
  assert result == 0
  data = json.loads((out / "scaling.json").read_text())
  assert data["target"] == "gpu:h100" and data["compiler"].startswith("jax-cuda12-plugin ")
  assert data["cost_source"] == "XLA:CPU cost analysis"
  (rec,) = data["compiled"]
  assert rec["chips"] == 2 and rec["facts"]["topology"] == "h100:1x1x2"
  assert rec["facts"]["flops"] > 0 and "all-reduce" in rec["facts"]["collectives"]
  assert rec["max_batch"] == {
      "max_batch_per_chip": 0, "at_limit": False, "footprint_per_chip_bytes": None,
      "hbm_per_chip_bytes": 1e6, "compiles": 1,
  }  # fmt: skip
  (p,) = data["projections"]
  assert p["system"] == "H100 SXM" and p["fits"] is False and p["fits_memory"] is False
  assert p["images_per_s"] is None and p["images_per_s_if_it_fit"] > 0  # could not run
  md = (out / "scaling.md").read_text()
  assert md.startswith("GPU scaling model:") and "XLA:CPU cost analysis" in md
  assert "| weak b2/device | h100:1x1x2 | 2 | 4 |" in md and "all-reduce" in md
  row = md.split("\n### train_cached")[1].split("\n\n")[1].splitlines()[-1]
  assert row.endswith("| no | 0 | – | – |")  # fits HBM, max batch; no images/s end to end
  assert (out / "scaling.png").stat().st_size > 0


@needs_cuda_plugin
@pytest.mark.slow
def test_largest_batch_per_gpu_fits_the_budget(two_h100s):
  config, devs, _, _, _ = two_h100s
  footprint = tpu.footprint_search("train_cached", config, devs, NUM_CLASSES, multiple=2)
  budget = footprint(2)  # 4 images per GPU
  got = tpu.max_batch_per_chip("train_cached", config, devs, 1, budget, NUM_CLASSES, 2, 16)
  assert got["max_batch_per_chip"] >= 4 and got["footprint_per_chip_bytes"] <= budget
  assert got["compiles"] <= 5


@needs_cuda_plugin
@pytest.mark.slow
def test_gpu_study_in_every_parallelism_form(tmp_path):
  out = tmp_path / "forms"
  run_command(
      scaling, *TINY, "--num_classes=3", "--target=gpu:h200", "--devices=2",
      "--batch_per_device=2", "--modes=train_cached", "--parallelism=jit,shard_map,pmap",
      f"--out={out}",
  )  # fmt: skip
  rows_ = json.loads((out / "forms.json").read_text())
  assert {r["form"] for r in rows_} == {"jit", "shard_map", "pmap"}
  assert all(r["system"] == "H200 SXM" and r["footprint_bytes"] > 0 for r in rows_)
  assert all("all-reduce" in r["collectives"] and r["images_per_s"] > 0 for r in rows_)
  for form in ("jit", "shard_map", "pmap"):
    result = json.loads((out / form / "scaling.json").read_text())
    assert result["parallelism"] == form and result["target"] == "gpu:h200"
  assert "gpu:h200" in (out / "forms.md").read_text()


@needs_cuda_plugin
@pytest.mark.slow
def test_wideresnet50_training_step_compiles_for_an_h100():
  """The paper's model (WideResNet50-2 at 288 px, D 1536) trains through the "xla"
  aggregation: the GPU compiler must build the step (it failed to tile the adapter's gradient
  product when it fused the level-shares concatenation into it)."""
  config = mvtec.get_config()
  config.model.kernels = "xla"
  devs, _, _ = gpu.topology_devices("h100", 1)
  facts = rows.compile_step("train", config, devs, 2, 3)
  assert facts["memory"]["footprint_bytes"] > 0
