"""The scaling study's pieces below the command (cras_jax/scaling.py): the steps one device
count compiles (and measures), the projections on the named systems, and the report."""

from __future__ import annotations

import os
import types

import jax
import numpy as np

from cras_jax import backbones
from cras_jax.perf import probes, roofline, rows, tpu
from cras_jax.perf.bench_report import collectives_text

OPTIMISER_NOTE = (
    "Optimiser semantics: the loss is a mean over the global batch (the gradient all-reduce "
    "sums per-device shares of it) and the learning rates are the config's, unchanged when the "
    "global batch changes (no linear scaling rule); a larger global batch is fewer, less noisy "
    "steps per epoch at the same learning rate. Weak scaling keeps the batch per device (the "
    "global batch grows with the devices: the optimisation changes); strong scaling keeps the "
    "global batch (the same optimisation, split finer)."
)


def series(devices: list[int], batch_per_device: list[int], global_batch: list[int]):
  """(scaling, n, global batch) of every step the study compiles: weak scaling at each batch
  per device, strong scaling at each global batch (counts that do not divide it skipped)."""
  out = []
  for b in batch_per_device:
    out += [(f"weak b{b}/device", n, b * n) for n in devices]
  for g in global_batch:
    out += [(f"strong B{g}", n, g) for n in devices if g % n == 0]
  return out


def run_count(config, args, n: int, plan: list[tuple], measure: bool) -> list[dict]:
  """Compiles every (mode, global batch) of `plan` on the first `n` devices; when `measure`,
  also times the step of the first batch (random weights, a short timed loop)."""
  devs = jax.devices()[:n]
  batches = sorted({g for _, m, g in plan if m == n})
  out, vars_ = [], None
  counter = probes.CompileCounter() if measure else None
  for g in batches:
    for mode in args.modes:
      facts = rows.compile_step(mode, config, devs, g, args.num_classes)
      rec = {"mode": mode, "devices": n, "global_batch": g, "facts": facts}
      if measure and g == batches[0]:
        if vars_ is None:
          vars_ = jax.device_get(
              backbones.load_variables(config.model.backbone, "random", config.data.crop, 0)
          )
        bench = types.SimpleNamespace(
            seed=0, num_batches=1, breakdown=False, profile=False, reps=args.reps,
            steps_per_rep=1, min_rep_seconds=0.0, out=args.out,
        )  # fmt: skip
        row = rows.bench_row(mode, config, bench, devs, g, args.num_classes, vars_, counter)
        rec["measured_step_s"] = row["median_s"]
        rec["measured_images_per_s"] = row["images_per_s"]
      out.append(rec)
      print(
          f"{n} dev, batch {g}, {mode}: {facts['flops'] or 0:.3g} FLOP/device, "
          f"{facts['bytes_accessed'] or 0:.3g} B accessed, collectives {facts['collectives']}"
          + (
              f", measured {rec['measured_step_s'] * 1e3:.1f} ms"
              if "measured_step_s" in rec
              else ""
          ),
          flush=True,
      )
  if counter is not None:
    counter.close()
  return out


def project_all(compiled: list[dict], plan, system_list, dtype: str, loader) -> list[dict]:
  """Every planned step on every system, with efficiencies (roofline.add_efficiency)."""
  by_key = {(r["mode"], r["devices"], r["global_batch"]): r for r in compiled}
  out = []
  for scaling, n, g in plan:
    for mode in sorted({r["mode"] for r in compiled}):
      rec = by_key.get((mode, n, g))
      if rec is None:
        continue
      for system in system_list:
        p = roofline.project(rec["facts"], system, dtype, n, g, loader)
        p.update(mode=mode, scaling=scaling)
        if system.name == "this CPU" and "measured_step_s" in rec:
          p["measured_step_s"] = rec["measured_step_s"]
          p["measured_images_per_s"] = rec["measured_images_per_s"]
          p["measured_over_projected"] = rec["measured_step_s"] / p["step_s"]
        out.append(p)
  return roofline.add_efficiency(out)


def _f(x, d=1):
  return "–" if x is None else f"{x:.{d}f}"


def markdown(result: dict) -> str:
  env, cal = result["environment"], result["calibration"]
  lines = [
      f"Scaling model: {result['config']} ({result['model']}), compiled on {env['platform']} "
      f"(simulated devices: {result['simulated']}), jax {env['jax']}.",
      "",
      "Projection: step = max(compute, memory, collectives) + host overhead per device "
      "(cras_jax/perf/roofline.py); efficiency = images/s at n / (n x images/s at 1).",
      "",
      f"This CPU, measured in this run: float32 matmul {cal['matmul_flops_per_s'] / 1e9:.1f} "
      f"GFLOP/s, memory {cal['memory_bytes_per_s'] / 1e9:.1f} GB/s.",
      "",
      result["optimiser_note"],
      "",
  ]
  for mode in result["modes"]:
    ps = [p for p in result["projections"] if p["mode"] == mode]
    lines += [
        f"### {mode}",
        "",
        "| scaling | system | devices | global batch | step ms | images/s | efficiency "
        "| binding | compute ms | memory ms | collectives ms | loader-bound | measured ms "
        "| measured / projected |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|---:|---:|",
    ]
    for p in ps:
      lines.append(
          f"| {p['scaling']} | {p['system']} | {p['devices']} | {p['global_batch']} | "
          f"{p['step_s'] * 1e3:.3g} | {p['images_per_s']:.4g} | {_f(p['efficiency'], 2)} | "
          f"{p['binding']} | {p['compute_s'] * 1e3:.3g} | {p['memory_s'] * 1e3:.3g} | "
          f"{p['collective_s'] * 1e3:.3g} | {'yes' if p['loader_bound'] else 'no'} | "
          f"{_f(p.get('measured_step_s') and p['measured_step_s'] * 1e3)} | "
          f"{_f(p.get('measured_over_projected'), 2)} |"
      )
    lines.append("")
  lines += ["Collectives per step (per device, from the optimised HLO):", ""]
  for r in result["compiled"]:
    lines.append(
        f"- {r['mode']}, {r['devices']} dev, batch {r['global_batch']}: "
        + (
            ", ".join(
                f"{k} x{v['count']} {v['operand_bytes'] / 2**20:.3g} MiB"
                for k, v in r["facts"]["collectives"].items()
            )
            or "none"
        )
        + f"; XLA memory {(r['facts']['memory'] or {}).get('footprint_bytes', 0) / 2**20:.4g} MiB"
        f"/device; compile {r['facts']['compile_s']:.1f} s"
    )
  lines += writes_tables(result)
  lines += ["", "Sources of the system figures:", ""]
  lines += [f"- {s['name']}: {s['source']}" for s in result["systems"]]
  return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
  import matplotlib  # here only: plotting, for the figure alone

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  ps = result["projections"]
  keys = sorted({(p["mode"], p["scaling"]) for p in ps})
  fig, axes = plt.subplots(2, len(keys), figsize=(4.5 * len(keys), 7), squeeze=False)
  for col, (mode, scaling) in enumerate(keys):
    for system in dict.fromkeys(p["system"] for p in ps):
      sel = sorted(
          (p for p in ps if (p["mode"], p["scaling"], p["system"]) == (mode, scaling, system)),
          key=lambda p: p["devices"],
      )
      if not sel:
        continue
      xs = [p["devices"] for p in sel]
      line = axes[0, col].plot(xs, [p["images_per_s"] for p in sel], "o-", label=system)[0]
      effs = [p["efficiency"] for p in sel]
      if any(e is not None for e in effs):  # none without a 1-device row (a TPU study from 4)
        axes[1, col].plot(xs, [np.nan if e is None else e for e in effs], "o-", label=system)
      meas = [(p["devices"], p["measured_images_per_s"]) for p in sel if "measured_step_s" in p]
      if meas:
        axes[0, col].plot(*zip(*meas), "x", ms=10, color=line.get_color(), label="CPU measured")
    axes[0, col].set_title(f"{mode}, {scaling}", fontsize=9)
    axes[0, col].set_yscale("log")
    axes[0, col].set_ylabel("projected images/s")
    axes[1, col].set_ylabel("efficiency vs 1 device")
    axes[1, col].set_ylim(0, 1.1)
    for ax in axes[:, col]:
      ax.set_xscale("log", base=2)
      ax.set_xlabel("devices")
      ax.grid(alpha=0.3)
  axes[0, 0].legend(fontsize=7)
  fig.suptitle(f"{result['config']}: {result['model']}", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def worker_env(n: int) -> dict:
  """The environment of a worker process simulating `n` CPU devices."""
  flags_ = os.environ.get("XLA_FLAGS", "").split()
  flags_ = [f for f in flags_ if not f.startswith("--xla_force_host_platform_device_count")]
  flags_.append(f"--xla_force_host_platform_device_count={n}")
  return dict(os.environ, XLA_FLAGS=" ".join(flags_), JAX_PLATFORMS="cpu")


def forms_rows(results: dict[str, dict]) -> list[dict]:
  """The studies of several `train.parallelism` forms ({form: result}) as one row per form
  and compiled step: per device (per chip on a TPU target) memory, bytes accessed, the
  collectives, the compile time and the projected images/s on the study's first system."""
  out = []
  for form, result in results.items():
    system = result["systems"][0]["name"]
    proj = {
        (p["mode"], p["devices"], p["global_batch"]): p
        for p in result["projections"]
        if p["system"] == system
    }
    for r in result["compiled"]:
      f = r["facts"]
      count = r.get("chips", r["devices"])
      per = tpu.per_chip(f) if "chips" in r else {**(f.get("memory") or {}), **f}
      p = proj.get((r["mode"], count, r["global_batch"]), {})
      out.append({
          "form": form,
          "mode": r["mode"],
          "count": count,
          "unit": (
              ("GPUs" if str(result.get("target", "")).startswith("gpu") else "chips")
              if "chips" in r
              else "devices"
          ),
          "global_batch": r["global_batch"],
          "compile_s": f["lower_s"] + f["compile_s"],
          "footprint_bytes": per.get("footprint_bytes"),
          "bytes_accessed": per.get("bytes_accessed"),
          "collectives": f["collectives"],
          "system": system,
          "images_per_s": p.get("images_per_s"),
          "binding": p.get("binding"),
      })  # fmt: skip
  return out


def forms_markdown(results: dict[str, dict]) -> str:
  """`forms_rows` as a table, the projected images/s also relative to the jit form's."""
  rows_ = forms_rows(results)
  first = next(iter(results.values()))
  jit = {
      (r["mode"], r["count"], r["global_batch"]): r["images_per_s"]
      for r in rows_
      if r["form"] == "jit"
  }
  unit = rows_[0]["unit"] if rows_ else "devices"
  per = {"chips": "chip", "GPUs": "GPU"}.get(unit, "device")
  lines = [
      f"Parallelism forms: {first['config']} ({first['model'].rsplit(', parallelism=', 1)[0]}),"
      f" {first.get('target', 'cpu')}; per {per}; projected on {rows_[0]['system'] if rows_ else '–'}"
      " (cras_jax/perf/roofline.py); collectives: count × operand bytes summed, per device.",
      "",
      f"| mode | form | {unit} | global batch | compile s | memory/{per} GB | GB accessed/{per} "
      "| collectives | images/s | vs jit | binding |",
      "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---|",
  ]
  for r in sorted(rows_, key=lambda r: (r["mode"], r["count"], r["global_batch"])):
    base = jit.get((r["mode"], r["count"], r["global_batch"]))
    ips = r["images_per_s"]
    lines.append(
        f"| {r['mode']} | {r['form']} | {r['count']} | {r['global_batch']} | "
        f"{r['compile_s']:.1f} | {_f(r['footprint_bytes'] and r['footprint_bytes'] / 1e9, 3)} | "
        f"{_f(r['bytes_accessed'] and r['bytes_accessed'] / 1e9, 3)} | "
        f"{collectives_text(r['collectives'])} | {_f(ips, 1)} | "
        f"{_f(ips / base if ips and base else None, 2)} | {r['binding'] or '–'} |"
    )
  return "\n".join(lines) + "\n"


def writes_tables(result: dict, k: int = 6) -> list[str]:
  """Where the bytes go: for each mode, the largest top-level writes of its compiled step at
  the largest device count and batch (`hlo.largest_writes`), with the cost analysis's bytes
  accessed beside them (per device)."""
  lines = []
  for mode in result["modes"]:
    recs = [r for r in result["compiled"] if r["mode"] == mode and "largest_writes" in r["facts"]]
    if not recs:
      continue
    r = max(recs, key=lambda r: (r["devices"], r["global_batch"]))
    f, lw = r["facts"], r["facts"]["largest_writes"]
    per = r["global_batch"] / r["devices"]
    unit = "GPUs" if str(result.get("target", "")).startswith("gpu") else "chips"
    count = f"{r['chips']} {unit}" if "chips" in r else f"{r['devices']} devices"
    lines += [
        "",
        f"Where the bytes go, {mode} ({count}, batch {r['global_batch']}; per device): "
        f"top-level writes {lw['total_bytes'] / 1e9:.3g} GB, cost analysis "
        f"{_f(f.get('bytes_accessed') and f['bytes_accessed'] / 1e9, 3)} GB accessed "
        f"({_f(f.get('bytes_accessed') and f['bytes_accessed'] / per / 1e9, 3)} GB per image), "
        f"{_f(f.get('flops') and f['flops'] / per / 1e9, 1)} GFLOP per image.",
        "",
        "| op | shape | MB written | share | source (JAX name scope) |",
        "|---|---|---:|---:|---|",
    ]
    for op in lw["ops"][:k]:
      src = op["source"].split("/")
      lines.append(
          f"| {op['op']} | `{op['shape']}` | {op['bytes'] / 1e6:.4g} | {op['share'] * 100:.1f} % | "
          f"{'/'.join(src[-3:])} |"
      )
  return lines
