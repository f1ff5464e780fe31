#!/usr/bin/env python
"""Throughput of populations of heads (`cras_jax.perf.population_bench`): images x models per
second against the population size, with compile times, and the speed-up over as many
separate single runs.

Examples (from the repository root):
  python -m cras_jax.population_bench --sizes=1,2,4,8,16 --setups=lite0_160 --modes=features
  python -m cras_jax.population_bench --setups=lite0_160,wrn50_288 --modes=features,backbone \\
      --out=runs/population_bench
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from absl import app, flags

from cras_jax.base import errors, fileio
from cras_jax.perf import population_bench as bench


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  fv = flag_values
  flags.DEFINE_list("sizes", ["1", "2", "4", "8", "16"], "Population sizes.", flag_values=fv)
  flags.DEFINE_list(
      "setups", ["lite0_160"], f"Backbone setups: {', '.join(bench.SETUPS)}.", flag_values=fv
  )
  flags.DEFINE_list(
      "modes",
      ["features"],
      "features: train on stored features; backbone: on images.",
      flag_values=fv,
  )
  flags.DEFINE_list(
      "batchings",
      ["map", "vmap"],
      "Population forms (train.population_batching): map, vmap.",
      flag_values=fv,
  )
  flags.DEFINE_integer("steps", 3, "Timed steps per row (after one warm step).", flag_values=fv)
  flags.DEFINE_integer("batch_size", 16, "Images per step (the demo's).", flag_values=fv)
  flags.DEFINE_integer(
      "steps_per_run",
      450,
      "Steps of one training for the whole-run ratio (the demo: 15 steps x 30 epochs).",
      flag_values=fv,
  )
  flags.DEFINE_string("out", None, "Directory for population_bench.{json,md}.", flag_values=fv)


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> int:
  fv = flag_values
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  bad = (
      [s for s in fv.setups if s not in bench.SETUPS]
      + [m for m in fv.modes if m not in ("features", "backbone")]
      + [b for b in fv.batchings if b not in ("map", "vmap")]
  )
  if bad:
    raise errors.UserValueError(f"unknown setup, mode or batching {', '.join(bad)}")
  sizes = [int(s) for s in fv.sizes]
  print(bench.HEADER, flush=True)
  rows, ratios = [], []
  for setup in fv.setups:
    for mode in fv.modes:
      part = bench.measure(setup, sizes, mode, fv.steps, fv.batch_size, fv.batchings)
      rows += part
      for batching in fv.batchings:
        r = bench.run_ratio(part, fv.steps_per_run, batching=batching)
        if r is not None:
          ratios.append({"setup": setup, "mode": mode, **r})
  lines = [bench.HEADER, *map(bench.markdown_row, rows), ""]
  for r in ratios:
    lines.append(
        f"{r['setup']}, {r['mode']}, {r['batching']}: {r['size']} seeds x {r['steps']} steps: "
        f"{r['separate_s']:.0f} s as separate runs, {r['population_s']:.0f} s as one "
        f"population: {r['ratio']:.2f}x"
    )
  text = "\n".join(lines) + "\n"
  print("\n" + text)
  if fv.out:
    os.makedirs(fv.out, exist_ok=True)
    fileio.atomic_write_json(
        os.path.join(fv.out, "population_bench.json"), {"rows": rows, "ratios": ratios}, indent=2
    )
    fileio.atomic_write_text(os.path.join(fv.out, "population_bench.md"), text)
  return 0


if __name__ == "__main__":
  define_flags()
  errors.define_verbose_flag()
  errors.run(main)
