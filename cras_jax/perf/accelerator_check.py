#!/usr/bin/env python
"""One call that checks and measures what matters on an accelerator (docs/performance.md).

Sized for a short slot (under 5 minutes on one H200; `--budget_s` bounds the benchmark) and
runnable on a CPU (`--tiny`, in CI). In order:
1. the platform, devices and versions;
2. one training step and one scoring step on the default device against the same steps on
   the host CPU backend of this process (`jax.devices("cpu")`), float32 and bfloat16, within
   the tolerances of cras_jax/perf/checks.py;
3. two identical runs of three deterministic training steps give bit-identical parameters;
4. the benchmark: WideResNet50-2 at 288 px and EfficientNet-Lite0 at 160 px, float32 and
   bfloat16, training and scoring, batch 32 to 256 (cras_jax/perf/rows.py: compile time,
   step time, images/s, XLA memory, device peak memory);
5. the exported scoring function's lowering for this platform (cras_jax/export.py) loads
   and scores like the scorer;
6. the scaling model (cras_jax/perf/roofline.py) for the local devices: its projection
   against the measured step.
Writes accelerator_check.json and accelerator_check.md into --out; exits 1 if a check fails.

  pip install -r requirements-cuda12.txt   # on an NVIDIA GPU host
  python -m cras_jax.accelerator_check --out=runs/accelerator_check
  python -m cras_jax.accelerator_check --tiny --out=runs/check   # a CPU, in seconds
"""

from __future__ import annotations

import io
import json
import os
import time
import types
from collections.abc import Sequence
from contextlib import redirect_stdout

import jax
from absl import app, flags

from cras_jax import backbones
from cras_jax.configs import demo, mvtec
from cras_jax.engine import steps
from cras_jax.perf import checks, probes, roofline, rows, systems

FULL = (("wide_resnet50_2", 288, mvtec), ("efficientnet_lite0", 160, demo))
TINY = (("efficientnet_lite0", 32, demo),)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  fv = flag_values
  flags.DEFINE_string("out", None, "Output directory.", flag_values=fv)
  flags.DEFINE_bool("tiny", False, "Tiny models and batches (a CPU, CI).", flag_values=fv)
  flags.DEFINE_list("batch_sizes", ["32", "256"], "Benchmark batch sizes.", flag_values=fv)
  flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "model.dtype values.", flag_values=fv)
  flags.DEFINE_list("modes", ["train", "score"], "Benchmark modes.", flag_values=fv)
  flags.DEFINE_integer("reps", 3, "Timed repetitions per benchmark row.", flag_values=fv)
  flags.DEFINE_float("budget_s", 200.0, "Benchmark rows stop after this.", flag_values=fv)
  flags.mark_flag_as_required("out", flag_values=fv)


def model_config(module, backbone: str, size: int, dtype: str, tiny: bool):
  """The config of one benchmarked model (random weights; tiny: small heads)."""
  args = types.SimpleNamespace(
      backbone=backbone, embed_dim=16 if tiny else None, pre_embed_dim=32 if tiny else None,
      levels=None, weights="random",
  )  # fmt: skip
  return rows.configure(module.get_config(), args, size, dtype)


def environment() -> dict:
  info = io.StringIO()
  with redirect_stdout(info):
    jax.print_environment_info()
  return {
      **probes.environment(),
      "devices": [str(d) for d in jax.devices()],
      "info": info.getvalue(),
  }


def benchmark(fv, models, counter) -> tuple[list[dict], list[str]]:
  """Benchmark rows until the budget is spent (the rest listed as skipped)."""
  out, skipped, t0 = [], [], time.perf_counter()
  bench = types.SimpleNamespace(
      seed=0, num_batches=2, breakdown=False, profile=False, reps=fv.reps, steps_per_rep=0,
      min_rep_seconds=0.2, out=fv.out,
  )  # fmt: skip
  n = len(jax.devices())
  for backbone, size, module in models:
    vars_ = jax.device_get(backbones.load_variables(backbone, "random", size, 0))
    for dtype in fv.dtypes:
      config = model_config(module, backbone, size, dtype, fv.tiny)
      for bs in fv.batch_sizes:
        for mode in fv.modes:
          label = rows.row_label(mode, config, n, int(bs))
          if time.perf_counter() - t0 > fv.budget_s or int(bs) % n:
            skipped.append(label)
            continue
          row = rows.bench_row(mode, config, bench, jax.devices(), int(bs), 4, vars_, counter)
          out.append(row)
          print(
              f"{label}: compile {row['lower_and_compile_s']:.1f} s, {row['images_per_s']:.1f} "
              f"images/s, peak memory {row['device_peak_bytes']}",
              flush=True,
          )
  return out, skipped


def scaling_check(fv, models, measured_rows: list[dict]) -> dict | None:
  """The roofline of the first measured row's step on this machine (peaks measured here)
  against its measured step time."""
  if not measured_rows:
    return None
  r = measured_rows[0]
  backbone, size, module = next(m for m in models if m[0] == r["backbone"])
  config = model_config(module, backbone, size, r["dtype"], fv.tiny)
  devs = jax.devices()
  facts = rows.compile_step(r["mode"], config, devs, r["batch_size"], 4)
  peak = probes.matmul_peak(devs, 2048 if devs[0].platform == "cpu" else 8192, "float32", 3, 0.2)
  bw = probes.memory_bandwidth(devs[0])
  here = systems.measured_system("here", peak["flops_per_s"], bw["bytes_per_s"], shared=False)
  p = roofline.project(facts, here, r["dtype"], len(devs), r["batch_size"])
  return {
      "row": rows.row_label(r["mode"], config, len(devs), r["batch_size"]),
      "matmul_flops_per_s": peak["flops_per_s"],
      "memory_bytes_per_s": bw["bytes_per_s"],
      "projection": p,
      "measured_step_s": r["median_s"],
      "measured_over_projected": r["median_s"] / p["step_s"],
  }


def markdown(result: dict) -> str:
  env = result["environment"]
  lines = [
      f"Accelerator check: {env['device_count']} x {env['device_kind']} ({env['platform']}), "
      f"jax {env['jax']}, {'tiny' if result['tiny'] else 'full'}; all ok: {result['ok']}",
      "",
      "| check | ok | details |",
      "|---|---|---|",
  ]
  for c in result["against_cpu"]:
    lines.append(
        f"| {c['dtype']} vs CPU | {c['ok']} | scores {c['scores_rel_diff']:.2e}, maps "
        f"{c['maps_rel_diff']:.2e}, loss {c['loss_rel_diff']:.2e} (relative); params "
        f"{c['params_max_abs_diff_in_lr']:.2f} lr |"
    )
  d, e = result["determinism"], result["export"]
  lines += [
      f"| bit-identical reruns | {d['ok']} | {d['steps']} deterministic steps, twice |",
      f"| export ({e['platform']}) | {e['ok']} | scores {e['scores_rel_diff']:.2e}, "
      f"{e['bytes'] / 1024:.0f} KiB |",
  ]
  s = result["scaling"]
  if s:
    lines.append(
        f"| scaling model | – | {s['row']}: measured / projected = "
        f"{s['measured_over_projected']:.2f} (binding {s['projection']['binding']}) |"
    )
  lines += [
      "",
      "| mode | backbone | image | dtype | batch | compile s | step ms | images/s "
      "| XLA MiB/device | peak MiB |",
      "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
  ]
  for r in result["benchmark"]:
    peak = r["device_peak_bytes"]
    lines.append(
        f"| {r['mode']} | {r['backbone']} | {r['image_size']} | {r['dtype']} | "
        f"{r['batch_size']} | {r['lower_and_compile_s']:.1f} | {r['median_s'] * 1e3:.1f} | "
        f"{r['images_per_s']:.1f} | {(r['xla_memory_bytes_per_device'] or 0) / 2**20:.0f} | "
        f"{'–' if peak is None else f'{peak / 2**20:.0f}'} |"
    )
  if result["skipped"]:
    lines += ["", "Not run (budget or batch): " + ", ".join(result["skipped"])]
  return "\n".join(lines) + "\n"


def run(fv: flags.FlagValues) -> dict:
  os.makedirs(fv.out, exist_ok=True)
  t0 = time.perf_counter()
  env = environment()
  print(env["info"], flush=True)
  models = TINY if fv.tiny else FULL
  backbone, size, module = models[-1]  # Lite0: the correctness checks' model
  batch = 2 if fv.tiny else 8
  vars_ = jax.device_get(backbones.load_variables(backbone, "random", size, 0))
  against, specs = [], {}
  for dtype in dict.fromkeys(["float32", *fv.dtypes]):
    specs[dtype] = steps.ModelSpec(model_config(module, backbone, size, dtype, fv.tiny), 4)
    if dtype in fv.dtypes:
      against.append(checks.against_cpu(specs[dtype], vars_, batch, dtype))
      print(f"against CPU ({dtype}): {against[-1]}", flush=True)
  spec = specs["float32"]
  determinism = checks.bit_identical(spec, vars_, batch)
  exported = checks.exported_scores(spec, vars_, batch)
  print(f"determinism: {determinism}\nexport: {exported}", flush=True)
  counter = probes.CompileCounter()
  try:
    bench, skipped = benchmark(fv, models, counter)
  finally:
    counter.close()
  scaling = scaling_check(fv, models, bench)
  ok = all(c["ok"] for c in against) and determinism["ok"] and exported["ok"]
  result = {
      "tiny": fv.tiny,
      "ok": ok,
      "environment": env,
      "against_cpu": against,
      "determinism": determinism,
      "export": exported,
      "benchmark": bench,
      "skipped": skipped,
      "scaling": scaling,
      "wall_s": time.perf_counter() - t0,
  }
  with open(os.path.join(fv.out, "accelerator_check.json"), "w") as f:
    json.dump(result, f, indent=1, default=str)
  md = markdown(result)
  with open(os.path.join(fv.out, "accelerator_check.md"), "w") as f:
    f.write(md)
  print("\n" + md + f"\n{result['wall_s']:.0f} s", flush=True)
  return result


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  return 0 if run(flag_values)["ok"] else 1
