#!/usr/bin/env python
"""Images/s of the exported scorer in JAX, onnxruntime and OpenVINO, in one run, at each ONNX
precision (`cras_jax.deploy.bench`; a benchmark, not a test).

Examples (from the repository root):
  python -m cras_jax.deploy_bench --setups=lite0_160,wrn50_288 --batch_sizes=1,8 \\
      --out=runs/deploy_bench
  # a trained run at fp32, fp16 and int8: metrics, flipped decisions, size, speed
  python -m cras_jax.deploy_bench --workdir=runs/demo --precisions=fp32,fp16,int8
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from absl import app, flags

from cras_jax.base import errors, fileio
from cras_jax.deploy import bench
from cras_jax.perf import population_bench


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  fv = flag_values
  flags.DEFINE_list(
      "setups", ["lite0_160"], f"Of {', '.join(population_bench.SETUPS)}.", flag_values=fv
  )
  flags.DEFINE_list("batch_sizes", ["1", "8"], "Images per call.", flag_values=fv)
  flags.DEFINE_list(
      "runtimes", list(bench.RUNTIMES), "Of jax, onnxruntime, openvino.", flag_values=fv
  )
  flags.DEFINE_float(
      "min_seconds", 3.0, "Timed seconds per row (at least 3 calls).", flag_values=fv
  )
  flags.DEFINE_string("out", None, "Directory for deploy_bench.{json,md}.", flag_values=fv)
  flags.DEFINE_list(
      "precisions",
      ["fp32"],
      f"ONNX precisions, of {', '.join(bench.PRECISIONS)} (python -m cras_jax.export "
      "--precision).",
      flag_values=fv,
  )
  flags.DEFINE_string(
      "workdir",
      None,
      "A trained run: export it at each of --precisions and measure I-AUROC, P-AUROC, AUPRO, "
      "decisions flipped against fp32, size and speed on its test split (instead of --setups).",
      flag_values=fv,
  )


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> int:
  fv = flag_values
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  bad = [s for s in fv.setups if s not in population_bench.SETUPS]
  bad += [r for r in fv.runtimes if r not in bench.RUNTIMES]
  if bad or "jax" not in fv.runtimes:
    raise errors.UserValueError(
        f"--setups/--runtimes: unknown {', '.join(bad) or '(none)'}; setups are "
        f"{', '.join(population_bench.SETUPS)}, runtimes {', '.join(bench.RUNTIMES)} (jax "
        f"included: the other rows are compared to it)"
    )
  try:
    sizes = [int(b) for b in fv.batch_sizes]
  except ValueError:
    sizes = []
  if not sizes or min(sizes) < 1:
    raise errors.UserValueError(f"--batch_sizes={','.join(fv.batch_sizes)}: positive integers")
  bad_precisions = [p for p in fv.precisions if p not in bench.PRECISIONS]
  if bad_precisions or not fv.precisions:
    raise errors.UserValueError(
        f"--precisions={','.join(fv.precisions)}: of {', '.join(bench.PRECISIONS)}"
    )
  if fv.workdir:
    runtimes = [r for r in fv.runtimes if r != "jax"] or list(bench.RUNTIMES[1:])
    rows = bench.measure_run(fv.workdir, fv.precisions, runtimes, sizes, fv.min_seconds)
    text = bench.markdown_run(rows, sizes)
  else:
    rows = []
    for setup in fv.setups:
      rows += bench.measure(setup, sizes, tuple(fv.runtimes), fv.min_seconds, fv.precisions)
    text = bench.markdown(rows)
  print(text)
  if fv.out:
    os.makedirs(fv.out, exist_ok=True)
    fileio.atomic_write_json(os.path.join(fv.out, "deploy_bench.json"), rows, indent=1)
    fileio.atomic_write_text(os.path.join(fv.out, "deploy_bench.md"), text)
  return 0


if __name__ == "__main__":
  define_flags()
  errors.define_verbose_flag()
  errors.run(main)
