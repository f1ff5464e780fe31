"""The scaling study for an accelerator compiled on a host without it
(`python -m cras_jax.scaling --target=tpu:<generation>` or `--target=gpu:<kind>`): every chip
count's steps compiled by libtpu (cras_jax/perf/tpu.py) or by JAX's CUDA plugin
(cras_jax/perf/gpu.py), their figures per chip, the roofline on the chip
(cras_jax/perf/systems.py) and, as an option, the largest batch per chip that fits its memory.
The GPU compiler gives no cost analysis: a GPU step's FLOPs and bytes accessed are another
compiler's for the same step (gpu.borrowed_cost), and the results name it."""

from __future__ import annotations

import time

from cras_jax.engine import resident
from cras_jax.perf import gpu, roofline, scaling_model, scaling_report, systems, tpu
from cras_jax.perf.targets import Target

GB = 1e9


def compile_counts(
    args, config, plan, target: Target, max_batch: bool, multiple: int, cost_from: str = "cpu"
):
  """Every (chips, global batch, mode) of `plan` compiled for `target` (`args.devices` are
  chip counts, the plan's batches global ones): records as scaling_model.run_count's, with
  `devices` the topology's devices and `chips` the chips. On a GPU target the FLOPs and bytes
  accessed per device are `cost_from`'s (gpu.borrowed_cost) at the same batch per device."""
  chip = target.chip
  cost = None
  if target.platform == "gpu":
    cost = gpu.borrowed_cost(cost_from, config, args.num_classes)
  out = []
  for n in args.devices:
    devs, name, per_chip = target.devices(n)
    for g in sorted({g for _, m, g in plan if m == n}):
      if g % len(devs):
        print(f"skip {name}, batch {g}: not divisible by its {len(devs)} devices", flush=True)
        continue
      for mode in args.modes:
        tpu.boundary(f"compiling {mode} for {name}, batch {g}")
        t0 = time.perf_counter()
        facts = tpu.compile_or_refusal(mode, config, devs, g, args.num_classes)
        facts.update(topology=name, chips=n, devices_per_chip=per_chip)
        rec = {
            "mode": mode,
            "devices": len(devs),
            "chips": n,
            "global_batch": g,
            "facts": facts,
            "compile_wall_s": time.perf_counter() - t0,
        }
        if "refused" in facts:
          facts["cost_source"] = None  # no program: no cost analysis to borrow for it either
        elif cost is None:
          facts["cost_source"] = f"{target.compiler()} cost analysis"
        else:  # the other compiler's seconds are its own (cost_compile_s)
          facts.update(cost(mode, g // len(devs)))
        if max_batch and g == min(gb for _, m, gb in plan if m == n):
          rec["max_batch"] = tpu.max_batch_per_chip(
              mode, config, devs, per_chip, chip.memory_per_device_bytes, args.num_classes,
              multiple, label=name,
          )  # fmt: skip
        out.append(rec)
        pc, u = tpu.per_chip(facts), target.unit
        if "refused" in facts:
          text = f"does not fit: the compiler refused it ({facts['refused']}), after"
        else:
          text = (
              f"{(pc['flops'] or 0) / 1e12:.3g} TFLOP/{u}, "
              f"{(pc['bytes_accessed'] or 0) / GB:.3g} GB accessed/{u} ({facts['cost_source']}), "
              f"{(pc['footprint_bytes'] or 0) / GB:.3g} GB memory/{u}, collectives "
              f"{facts['collectives']}, compile"
          )
        print(
            f"{name} ({n} {u}s), batch {g}, {mode}: {text} {rec['compile_wall_s']:.1f} s"
            + (f", max batch/{u} {rec['max_batch']}" if "max_batch" in rec else ""),
            flush=True,
        )
  return out


def project(
    compiled: list[dict], plan, chip: systems.System, dtype: str, loader, feeds=None
) -> list[dict]:
  """Each compiled step on its target's `chip` (each device 1/k of it where a chip has k
  devices); `devices` in the projections are chips, the efficiency against one chip. Each
  says whether the step's compiled memory per chip fits the chip's HBM
  (scaling_model.memory_fit; a step the compiler refused does not); one that does not has no
  images/s (scaling_model.withhold_unfit). End to end, the host's terms per chip
  (scaling_model.add_end_to_end; `feeds`: {mode: roofline.HostFeed})."""
  by_key = {(r["mode"], r["chips"], r["global_batch"]): r for r in compiled}
  unit = "GPU" if chip in systems.GPU_CHIPS.values() else "chip"
  out = []
  for scaling, n, g in plan:
    for mode in sorted({r["mode"] for r in compiled}):
      rec = by_key.get((mode, n, g))
      if rec is None:
        continue
      f = rec["facts"]
      if "refused" in f:
        p = scaling_model.refused_projection(chip.name, n, g)
      else:
        system = systems.per_device(chip, f["devices_per_chip"])
        p = roofline.project(f, system, dtype, rec["devices"], g, loader)
      p.update(mode=mode, scaling=scaling, system=chip.name, devices=n)
      per_chip = {"memory": {"footprint_bytes": tpu.per_chip(f)["footprint_bytes"]}}
      if "refused" in f:
        per_chip["refused"] = f["refused"]
      p.update(scaling_model.memory_fit(per_chip, chip, n, unit=unit))
      out.append(p)
  roofline.add_efficiency([p for p in out if p["images_per_s"] is not None])
  return scaling_model.add_end_to_end(scaling_model.withhold_unfit(out), {chip.name: chip}, feeds)


def _gb(x) -> str:
  return "–" if x is None else f"{x / GB:.3g}"


def _exchanges(facts: dict) -> str:
  parts = [
      f"{k} {v['count']}× {v['operand_bytes'] / v['count'] / 1e6:.3g} MB"
      for k, v in sorted(facts["collectives"].items())
  ]
  return ", ".join(parts) or "none"


def _seconds(s: float) -> str:
  return f"{s:.0f}" if s >= 10 else f"{s:.1f}"


def cost_note(result: dict) -> str:
  """Where a study's FLOPs and bytes accessed came from (each compiled step records it)."""
  sources = sorted(
      {
          r["facts"].get("cost_source") or "–"
          for r in result["compiled"]
          if "refused" not in r["facts"]
      }
  )
  text = "; ".join(sources) or "–"
  if not result["target"].startswith("gpu:"):
    return f"FLOPs and bytes accessed: {text}."
  return (
      f"FLOPs and bytes accessed per GPU: {text} of the same step compiled at the same batch "
      "per device (the GPU compiler gives no cost analysis). The arithmetic is the step's; "
      "the bytes are that compiler's fusion's, not the GPU program's, so the memory term "
      "(and a memory binding) is an estimate. Memory, collectives and compile time are the "
      "GPU program's."
  )


def compile_total(result: dict) -> str:
  """One line: the rows' compile seconds (lowering + compiling) in all and per step."""
  per_mode = {m: 0.0 for m in result["modes"]}
  for r in result["compiled"]:
    per_mode[r["mode"]] = (
        per_mode.get(r["mode"], 0.0) + r["facts"]["lower_s"] + r["facts"]["compile_s"]
    )
  parts = ", ".join(f"{m} {_seconds(t)}" for m, t in per_mode.items())
  return (
      f"Compile time of the {len(result['compiled'])} rows (lowering + compiling, this host): "
      f"{_seconds(sum(per_mode.values()))} s in all ({parts} s)."
  )


def markdown(result: dict) -> str:
  """The study as tables: per mode, one row per compiled step (figures per chip)."""
  env = result["environment"]
  gpu_target = result["target"].startswith("gpu:")
  u = "GPU" if gpu_target else "chip"
  compiler = result.get("compiler") or f"libtpu {result['libtpu']}"
  lines = [
      f"{'GPU' if gpu_target else 'TPU'} scaling model: {result['config']} ({result['model']}), "
      f"{result['target']} compiled on {env['platform']} without a {'GPU' if gpu_target else 'TPU'}"
      f" by {compiler} (jax {env['jax']}): compile-only topologies, figures per {u}"
      + ("." if gpu_target else " (a chip's devices summed)."),
      "",
      "Projection: step = max(compute, memory, collectives) + host overhead "
      f"(cras_jax/perf/roofline.py) on the {u} of cras_jax/perf/systems.py; efficiency = "
      f"images/s at n {u}s / (n x images/s at 1 {u}).",
      "",
      cost_note(result),
      "",
      f"Fits HBM: the compiled memory per {u} (footprint: arguments + outputs + temporaries - "
      f"aliased) against the {u}'s HBM; a step over it, or one the compiler refused for memory,"
      " does not fit: it could not run, so its row has no step time, images/s or efficiency.",
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
        f"| scaling | topology | {u}s | global batch | compile s | TFLOP/{u} | GB accessed/{u} "
        f"| memory/{u} GB (args / out / temp / footprint) | exchanges per step (count × MB each)"
        f" | step ms | images/s | efficiency | binding | fits HBM | max batch/{u} "
        "| end-to-end images/s | bound by |",
        "|---|---|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---|---|---:|---:|---|",
    ]
    for p in ps:
      r = by_key[(mode, p["devices"], p["global_batch"])]
      f, pc = r["facts"], tpu.per_chip(r["facts"])
      mb = r.get("max_batch")
      lines.append(
          f"| {p['scaling']} | {f['topology']} | {r['chips']} | {r['global_batch']} | "
          f"{_seconds(f['lower_s'] + f['compile_s'])} | "
          f"{scaling_report._f(pc['flops'] and pc['flops'] / 1e12, g=3)} | "
          f"{_gb(pc['bytes_accessed'])} | {_gb(pc['argument_bytes'])} / {_gb(pc['output_bytes'])}"
          f" / {_gb(pc['temp_bytes'])} / {_gb(pc['footprint_bytes'])} | {_exchanges(f)} | "
          f"{scaling_report._ms(p['step_s'] if p['fits'] is not False else None)} | "
          f"{scaling_report.images_text(p)} | {scaling_report._f(p['efficiency'], 2)} | "
          f"{p['binding'] or '–'} | {scaling_report.fits_text(p)} | "
          f"{'–' if mb is None else ('≥' if mb['at_limit'] else '') + str(mb['max_batch_per_chip'])} |"
          f" {scaling_report.e2e_cells(p)} |"
      )
    lines.append("")
  lines += scaling_report.host_note(result)
  lines += resident_table(result)
  lines += [compile_total(result), ""]
  lines += scaling_report.writes_tables(result) + [""]
  lines += [f"Source of the {u}'s figures:", ""]
  lines += [f"- {s['name']}: {s['source']}" for s in result["systems"]]
  return "\n".join(lines) + "\n"


def resident_rows(result: dict) -> list[dict]:
  """Per training row: whether its training set (`result["train_images"]` images, as the
  host would send them: uint8 at the crop, or the stored features) fits on the devices beside
  the step (`data.on_device`, engine/resident.py): the rows a chip holds (split along the data
  axis) plus the step's compiled footprint, against the chip's HBM and "auto"'s margin."""
  n, out = result.get("train_images"), []
  for p in result["projections"]:
    feed = result["host_feeds"].get(p["mode"])
    hbm, footprint = p.get("memory_available_bytes"), p.get("memory_needed_bytes")
    if not (n and feed and hbm and footprint) or p.get("fits") is False:
      continue
    data = resident.bytes_per_device(n, p["devices"], feed["bytes_per_image"] - 4)
    auto = resident.decide("auto", p["mode"], data, footprint, hbm)
    # on the devices only the indices cross the host link and nothing is read per step: the
    # end-to-end rate is the step's, or the loop thread's dispatch where that binds
    rates = [r for r in (p.get("images_per_s"), p.get("dispatch_images_per_s")) if r]
    out.append(
        {
            "mode": p["mode"], "chips": p["devices"], "global_batch": p["global_batch"],
            "data_bytes": data, "footprint_bytes": footprint, "hbm_bytes": hbm,
            "fits": data + footprint <= hbm, "auto": auto.on_device,
            "from_host_images_per_s": p.get("end_to_end_images_per_s"),
            "bound_by": p.get("bound_by"),
            "on_device_images_per_s": min(rates) if rates else None,
        }
    )  # fmt: skip
  return out


def resident_table(result: dict) -> list[str]:
  """`resident_rows` as a table (none where nothing trains or nothing can be compared)."""
  found = resident_rows(result)
  if not found:
    return []
  u = "GPU" if result["target"].startswith("gpu:") else "chip"
  lines = [
      f"Training data on the devices (data.on_device): the training set of "
      f"{result['train_images']:,} images split over the {u}s beside the step's compiled "
      f"footprint; auto puts it there within {resident.MARGIN:.0%} of the HBM.",
      "",
      f"| mode | {u}s | global batch | data/{u} GB | step/{u} GB | total GB | HBM GB | fits "
      "| auto | end-to-end images/s from the host (bound by) | on the devices |",
      "|---|---:|---:|---:|---:|---:|---:|---|---|---|---:|",
  ]
  for r in found:
    lines.append(
        f"| {r['mode']} | {r['chips']} | {r['global_batch']} | {_gb(r['data_bytes'])} | "
        f"{_gb(r['footprint_bytes'])} | {_gb(r['data_bytes'] + r['footprint_bytes'])} | "
        f"{_gb(r['hbm_bytes'])} | {'yes' if r['fits'] else 'no'} | "
        f"{'on the devices' if r['auto'] else 'host'} | "
        f"{scaling_report._f(r['from_host_images_per_s'], 0)} ({r['bound_by'] or '–'}) | "
        f"{scaling_report._f(r['on_device_images_per_s'], 0) if r['fits'] else '–'} |"
    )
  return lines + [
      "",
      "On the devices: the step's images/s (or the loop thread's dispatch, where it binds): "
      "no batch crosses the host link and nothing is read per step.",
      "",
  ]
