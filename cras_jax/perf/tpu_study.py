"""The scaling study for a TPU generation compiled on a host without a TPU
(`python -m cras_jax.scaling --target=tpu:<generation>`): every chip count's steps compiled by
libtpu (cras_jax/perf/tpu.py), their figures per chip, the roofline on the generation's chip
(cras_jax/perf/systems.py) and, as an option, the largest batch per chip that fits its HBM."""

from __future__ import annotations

import time

from cras_jax.perf import roofline, rows, scaling_model, systems, tpu

GB = 1e9


def compile_counts(args, config, plan, generation: str, max_batch: bool, multiple: int):
  """Every (chips, global batch, mode) of `plan` compiled for `generation` (`args.devices`
  are chip counts, the plan's batches global ones): records as scaling_model.run_count's,
  with `devices` the topology's devices and `chips` the chips."""
  chip = systems.TPU_CHIPS[generation]
  out = []
  for n in args.devices:
    devs, name, per_chip = tpu.topology_devices(generation, n)
    for g in sorted({g for _, m, g in plan if m == n}):
      if g % len(devs):
        print(f"skip {name}, batch {g}: not divisible by its {len(devs)} devices", flush=True)
        continue
      for mode in args.modes:
        t0 = time.perf_counter()
        facts = rows.compile_step(mode, config, devs, g, args.num_classes)
        facts.update(topology=name, chips=n, devices_per_chip=per_chip)
        rec = {
            "mode": mode,
            "devices": len(devs),
            "chips": n,
            "global_batch": g,
            "facts": facts,
            "compile_wall_s": time.perf_counter() - t0,
        }
        if max_batch and g == min(gb for _, m, gb in plan if m == n):
          rec["max_batch"] = tpu.max_batch_per_chip(
              mode, config, devs, per_chip, chip.memory_per_device_bytes, args.num_classes,
              multiple,
          )  # fmt: skip
        out.append(rec)
        pc = tpu.per_chip(facts)
        print(
            f"{name} ({n} chips), batch {g}, {mode}: {(pc['flops'] or 0) / 1e12:.3g} TFLOP/chip, "
            f"{(pc['bytes_accessed'] or 0) / GB:.3g} GB accessed/chip, "
            f"{(pc['footprint_bytes'] or 0) / GB:.3g} GB memory/chip, collectives "
            f"{facts['collectives']}, compile {rec['compile_wall_s']:.1f} s"
            + (f", max batch/chip {rec['max_batch']}" if "max_batch" in rec else ""),
            flush=True,
        )
  return out


def project(compiled: list[dict], plan, generation: str, dtype: str, loader) -> list[dict]:
  """Each compiled step on its generation's chip (each device 1/k of it where a chip has k
  devices); `devices` in the projections are chips, the efficiency against one chip."""
  chip = systems.TPU_CHIPS[generation]
  by_key = {(r["mode"], r["chips"], r["global_batch"]): r for r in compiled}
  out = []
  for scaling, n, g in plan:
    for mode in sorted({r["mode"] for r in compiled}):
      rec = by_key.get((mode, n, g))
      if rec is None:
        continue
      system = systems.per_device(chip, rec["facts"]["devices_per_chip"])
      p = roofline.project(rec["facts"], system, dtype, rec["devices"], g, loader)
      p.update(mode=mode, scaling=scaling, system=chip.name, devices=n)
      out.append(p)
  return roofline.add_efficiency(out)


def _gb(x) -> str:
  return "–" if x is None else f"{x / GB:.3g}"


def _exchanges(facts: dict) -> str:
  parts = [
      f"{k} {v['count']}× {v['operand_bytes'] / v['count'] / 1e6:.3g} MB"
      for k, v in sorted(facts["collectives"].items())
  ]
  return ", ".join(parts) or "none"


def markdown(result: dict) -> str:
  """The study as tables: per mode, one row per compiled step (figures per chip)."""
  env = result["environment"]
  lines = [
      f"TPU scaling model: {result['config']} ({result['model']}), {result['target']} "
      f"compiled on {env['platform']} without a TPU by libtpu {result['libtpu']} "
      f"(jax {env['jax']}): compile-only topologies, figures per chip (a chip's devices "
      "summed).",
      "",
      "Projection: step = max(compute, memory, collectives) + host overhead "
      "(cras_jax/perf/roofline.py) on the chip of cras_jax/perf/systems.py; efficiency = "
      "images/s at n chips / (n x images/s at 1 chip).",
      "",
      result["optimiser_note"],
      "",
  ]
  by_key = {(r["mode"], r["chips"], r["global_batch"]): r for r in result["compiled"]}
  for mode in result["modes"]:
    ps = [p for p in result["projections"] if p["mode"] == mode]
    lines += [
        f"### {mode}",
        "",
        "| scaling | topology | chips | global batch | compile s | TFLOP/chip | GB accessed/chip "
        "| memory/chip GB (args / out / temp / footprint) | exchanges per step (count × MB each)"
        " | step ms | images/s | efficiency | binding | fits HBM | max batch/chip |",
        "|---|---|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---|---|---:|",
    ]
    for p in ps:
      r = by_key[(mode, p["devices"], p["global_batch"])]
      f, pc = r["facts"], tpu.per_chip(r["facts"])
      mb = r.get("max_batch")
      lines.append(
          f"| {p['scaling']} | {f['topology']} | {r['chips']} | {r['global_batch']} | "
          f"{f['lower_s'] + f['compile_s']:.0f} | {(pc['flops'] or 0) / 1e12:.3g} | "
          f"{_gb(pc['bytes_accessed'])} | {_gb(pc['argument_bytes'])} / {_gb(pc['output_bytes'])}"
          f" / {_gb(pc['temp_bytes'])} / {_gb(pc['footprint_bytes'])} | {_exchanges(f)} | "
          f"{p['step_s'] * 1e3:.3g} | {p['images_per_s']:.4g} | "
          f"{scaling_model._f(p['efficiency'], 2)} | {p['binding']} | "
          f"{'–' if p['fits_memory'] is None else ('yes' if p['fits_memory'] else 'no')} | "
          f"{'–' if mb is None else ('≥' if mb['at_limit'] else '') + str(mb['max_batch_per_chip'])} |"
      )
    lines.append("")
  lines += scaling_model.writes_tables(result) + [""]
  lines += ["Source of the chip's figures:", ""]
  lines += [f"- {s['name']}: {s['source']}" for s in result["systems"]]
  return "\n".join(lines) + "\n"
