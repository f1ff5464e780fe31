"""cras_jax.benchmark at a tiny setting: the JSON has its fields with positive numbers, the
markdown table and the plot are written, and `--devices=1,2` gives a row per device count."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cras_jax.perf import benchmark as bench
from cras_jax.perf import probes as benchmark_probes
from tests.conftest import parse_command_flags

ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "--config=configs/demo.py",
    "--backbone=efficientnet_lite0",
    "--image_size=64",
    "--embed_dim=32",
    "--reps=2",
    "--steps_per_rep=2",
    "--matmul_size=256",
    "--min_rep_seconds=0.1",
]

POSITIVE = (
    "lower_s",
    "compile_s",
    "lower_and_compile_s",
    "first_call_s",
    "median_s",
    "min_s",
    "max_s",
    "images_per_s",
    "images_per_s_best",
    "flops_per_step",
    "flops_per_step_per_device",
    "achieved_flops_per_s",
    "peak_flops_per_s_f32",
    "ratio_to_peak_f32",
    "xla_memory_bytes_per_device",
    "process_cpu_per_wall_s",
)


def check_rows(result, expect):
  rows = result["rows"]
  assert sorted((r["mode"], r["devices"], r["batch_size"]) for r in rows) == sorted(expect)
  for r in rows:
    for k in POSITIVE:
      assert isinstance(r[k], (int, float)) and r[k] > 0, (k, r[k])
    assert r["iqr_s"] >= 0 and r["min_s"] <= r["median_s"] <= r["max_s"]
    assert len(r["rep_step_times_s"]) == r["reps"] == 2
    assert r["images_per_s"] == r["batch_size"] / r["median_s"]
    assert r["ratio_to_peak_f32"] == r["achieved_flops_per_s"] / r["peak_flops_per_s_f32"]
    assert r["flops_per_step"] == r["flops_per_step_per_device"] * r["devices"]
    assert r["recompiles_during_timing"] == 0
    assert r["device_peak_bytes"] is None or r["device_peak_bytes"] > 0
    assert (r["backbone"], r["image_size"], r["embed_dim"], r["dtype"]) == (
        "efficientnet_lite0",
        64,
        32,
        "float32",
    )
    shares = r["stage_shares"]
    assert set(shares) == set(benchmark_probes.STAGE_NAMES)
    assert abs(sum(shares.values()) - 1) < 1e-9 and min(shares.values()) >= 0
    assert shares["adapter_matching"] > 0 and shares["discriminator"] > 0
    # The frozen backbone is in every step but the one on stored features.
    assert (shares["backbone"] > 0) == (r["mode"] != "train_cached"), (r["mode"], shares)
    assert 0 < r["matmul_time_share"] < 1
  for p in result["matmul_peaks"]:
    assert p["flops_per_s"] > 0 and p["dtype"] == "float32"


def _one_device(out, modes: str) -> dict:
  """The benchmark in this process on one device, batch 4, float32."""
  return bench.run(
      parse_command_flags(
          bench,
          *TINY,
          "--batch_sizes=4",
          "--devices=1",
          "--dtype=float32",
          f"--modes={modes}",
          f"--out={out}",
      )
  )


def check_loop_rows(result, expect):
  """The training loop's rows (cras_jax/perf/loop_probe.py): one per training row, each timed
  over its reps, beside the step alone of the same shape."""
  loops = result["loop"]
  assert sorted((r["mode"], r["devices"], r["batch_size"]) for r in loops) == sorted(expect)
  steps = {(r["mode"], r["devices"], r["batch_size"]): r for r in result["rows"]}
  for r in loops:
    assert r["log_every"] == 5 and r["steps_per_rep"] == 10 and r["reps"] == 2  # the demo's
    assert len(r["rep_step_times_s"]) == 2 and r["min_s"] <= r["median_s"] <= r["max_s"]
    assert r["images_per_s"] == r["batch_size"] / r["median_s"]
    step = steps[(r["mode"], r["devices"], r["batch_size"])]
    assert r["step_only_median_s"] == step["median_s"]
    assert r["loop_over_step"] == r["median_s"] / step["median_s"]
    assert 0 <= r["host_share_min"] <= r["host_share"] <= r["host_share_max"] <= 1
    assert r["device_wait_s_per_step"] >= 0 and r["next_wait_s_per_step"] >= 0
    assert 0 < r["dispatch_s"] <= r["dispatch_s_max"]
    assert r["log_s_per_step"] > 0 and r["check_s_per_step"] > 0  # the hooks ran
    assert r["host_work_s"] == r["dispatch_s"] + r["log_s_per_step"]
    assert r["producer_alone_images_per_s"] > 0 and r["producer_s_per_batch"] > 0
    assert r["dataset_images"] % r["batch_size"] == 0
    if r["mode"] == "train_cached":  # 8 x 8 patches of 32 float32 features, and the label
      assert r["bytes_per_image"] == 64 * 32 * 4 + 4 and r["reader_workers"] is None
    else:
      assert r["bytes_per_image"] == 64 * 64 * 3 + 4 and r["reader_workers"] >= 1


def test_stored_feature_step_on_one_device_in_process(tmp_path):
  """The cheapest row (the step on stored features, one device): the fast tier's run of the
  benchmark, its files and record, with the training loop on stored features end to end."""
  out = tmp_path / "bench"
  result = _one_device(out, "train_cached")
  check_rows(result, [("train_cached", 1, 4)])
  check_loop_rows(result, [("train_cached", 1, 4)])
  with open(out / "benchmark.json") as f:
    saved = json.load(f)
  assert saved["rows"] == json.loads(json.dumps(result["rows"]))
  assert saved["loop"] == json.loads(json.dumps(result["loop"]))
  md = (out / "benchmark.md").read_text()
  assert md.count("\n| train_cached |") == 1 and md.count("\n| loop: train_cached |") == 1


@pytest.mark.slow
def test_one_device_in_process(tmp_path):
  out = tmp_path / "bench"
  result = _one_device(out, "train,train_cached,score")
  check_rows(result, [("train", 1, 4), ("train_cached", 1, 4), ("score", 1, 4)])
  check_loop_rows(result, [("train", 1, 4), ("train_cached", 1, 4)])
  # Without the backbone the step does fewer operations.
  flops = {r["mode"]: r["flops_per_step"] for r in result["rows"]}
  assert flops["train_cached"] < flops["train"]
  with open(out / "benchmark.json") as f:
    assert json.load(f)["rows"] == json.loads(json.dumps(result["rows"]))
  md = (out / "benchmark.md").read_text()
  assert md.count("\n| train |") == 1 and md.count("\n| score |") == 1
  assert md.count("\n| train_cached |") == 1
  assert "| backbone % | adapter+matching % | discriminator % | other % | matmul ops % |" in md
  assert (out / "benchmark.png").stat().st_size > 10_000
  assert str(tmp_path) not in json.dumps(result)  # no machine paths in the record


@pytest.mark.slow
def test_two_devices_subprocess(tmp_path):
  out = tmp_path / "bench"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "cras_jax.benchmark",
          *TINY,
          "--batch_sizes=4",
          "--devices=1,2",
          f"--out={out}",
      ],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(out / "benchmark.json") as f:
    result = json.load(f)
  assert result["environment"]["device_count"] == 2
  check_rows(result, [("train", 1, 4), ("score", 1, 4), ("train", 2, 4), ("score", 2, 4)])
  assert sorted(p["devices"] for p in result["matmul_peaks"]) == [1, 2]
  assert "| train |" in proc.stdout and (out / "benchmark.png").exists()
