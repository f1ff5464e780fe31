"""The accelerator check (cras_jax/accelerator_check.py) in tiny form on the CPU."""

import json

import pytest

from tests.conftest import run_module


@pytest.mark.slow
def test_accelerator_check_tiny_on_cpu(tmp_path):
  out = tmp_path / "check"
  log = run_module(
      "cras_jax.accelerator_check",
      "--tiny",
      "--batch_sizes=2",
      "--modes=score",
      "--dtypes=float32",
      "--budget_s=3600",
      "--reps=1",
      f"--out={out}",
      timeout=1200,
  )
  assert "Accelerator check" in log
  result = json.loads((out / "accelerator_check.json").read_text())
  assert result["ok"] and result["tiny"]
  assert [c["dtype"] for c in result["against_cpu"]] == ["float32"]
  # on a CPU host the "accelerator" is the CPU: the same program gives the same numbers
  assert all(c["scores_rel_diff"] <= 1e-6 for c in result["against_cpu"])
  assert result["determinism"]["bit_identical"]
  assert result["export"]["platform"] == "cpu" and result["export"]["ok"]
  assert [(r["dtype"], r["batch_size"]) for r in result["benchmark"]] == [("float32", 2)]
  assert result["scaling"]["measured_over_projected"] > 0
  md = (out / "accelerator_check.md").read_text()
  assert "bit-identical reruns | True" in md and "| score | efficientnet_lite0 | 32 |" in md
