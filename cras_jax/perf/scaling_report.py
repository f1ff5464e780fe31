"""The scaling study as people read it: its markdown (step-only and end-to-end images/s, what
binds, whether each step fits), the notes on the host figures and memory, the forms compared,
and the plot."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from cras_jax.base import errors, fileio, fs
from cras_jax.engine import resident
from cras_jax.perf import tpu
from cras_jax.perf.bench_report import collectives_text


def host_note(result: dict) -> list[str]:
  """What the end-to-end columns take from the host, per training mode (result["host_feeds"])
  and per system (result["systems"]' host figures)."""
  feeds = result.get("host_feeds") or {}
  if not feeds:
    return []
  lines = [
      "End to end: min(step, host link, loader, dispatch) images/s, all chips together "
      '(cras_jax/perf/roofline.py `end_to_end`; "bound by" names the smallest). Per mode:',
      "",
  ]
  for mode, f in feeds.items():
    threads = (
        "the prefetch thread alone, one per host"
        if f["threads"] == "one"
        else (
            f"{f['loader_threads_per_host']} reader workers per host"
            if f["loader_threads_per_host"]
            else "one reader worker per host thread"
        )
    )
    lines.append(
        f"- {mode}: {f['bytes_per_image'] / 1e6:.4g} MB per image over the host link; loader "
        f"{_f(f['loader_images_per_s_per_thread'], 0)} images/s per thread, {threads}; "
        f"dispatch {_f(f['dispatch_s'] and f['dispatch_s'] * 1e3, 2)} ms per step"
        + (f" ({f['source']})" if f.get("source") else "")
    )
  lines += ["", "Host figures per system:", ""]
  for s in result["systems"]:
    if "host_link_gb_s" in s:
      lines.append(
          f"- {s['name']}: host link {_f(s['host_link_gb_s'], 0)} GB/s per chip, "
          f"{s['host_threads'] or '–'} host threads, {s['chips_per_host'] or 'all'} chips per "
          f"host ({s['host_source'] or 'no source'})"
      )
  return lines + [""]


def e2e_cells(p: dict) -> str:
  """The end-to-end cells of a projection's row: images/s and what binds."""
  return f"{_f(p.get('end_to_end_images_per_s'), None, 4)} | {p.get('bound_by') or '–'}"


def fits_text(p: dict) -> str:
  """A projection's "fits" cell: yes, no or unknown (no memory analysis or capacity)."""
  return {True: "yes", False: "no"}.get(p.get("fits"), "unknown")


def images_text(p: dict, digits: int = 4) -> str:
  """A projection's images/s cell: the figure, or why the step does not fit (it could not
  run, so it has none)."""
  if p.get("fits") is False:
    return f"(does not fit: {p['does_not_fit']})"
  return _f(p["images_per_s"], None, digits)


def _f(x, d=1, g=None):
  """x with `d` decimals (or `g` significant digits), "–" for None."""
  if x is None:
    return "–"
  return f"{x:.{g}g}" if g else f"{x:.{d}f}"


def _ms(x) -> str:
  return "–" if x is None else f"{x * 1e3:.3g}"


def _mib(x) -> str:
  return "unknown" if x is None else f"{x / 2**20:.4g} MiB"


def fits_note(result: dict) -> str:
  """What the "fits" column compares."""
  host = result.get("host_memory") or {}
  here = (
      f"{resident.gb(host['bytes'])} of {host['what']} when the study started"
      if host.get("bytes")
      else "unknown here"
  )
  return (
      "Fits: the step's compiled memory (XLA's memory analysis: arguments + outputs + "
      "temporaries - aliased, per device, of the program compiled here) against each system's "
      "memory per device (a GPU's or TPU chip's HBM); on this machine's own system, every "
      f"simulated device's footprint together against the host's memory ({here}). A step that "
      "does not fit could not run: its row has no step time, images/s or efficiency."
  )


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
      fits_note(result),
      "",
      result["optimiser_note"],
      "",
  ]
  for mode in result["modes"]:
    ps = [p for p in result["projections"] if p["mode"] == mode]
    lines += [
        f"### {mode}",
        "",
        "| scaling | system | devices | global batch | fits | step ms | images/s | efficiency "
        "| binding | compute ms | memory ms | collectives ms | loader-bound | measured ms "
        "| measured / projected | end-to-end images/s | bound by |",
        "|---|---|---:|---:|---|---:|---:|---:|---|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for p in ps:
      ran = p.get("fits") is not False  # a step that does not fit has no step time
      lines.append(
          f"| {p['scaling']} | {p['system']} | {p['devices']} | {p['global_batch']} | "
          f"{fits_text(p)} | {_ms(p['step_s'] if ran else None)} | {images_text(p)} | "
          f"{_f(p['efficiency'], 2)} | {p['binding'] or '–'} | {_ms(p['compute_s'])} | "
          f"{_ms(p['memory_s'])} | {_ms(p['collective_s'])} | "
          f"{'yes' if p['loader_bound'] else 'no'} | "
          f"{_f(p.get('measured_step_s') and p['measured_step_s'] * 1e3)} | "
          f"{_f(p.get('measured_over_projected'), 2)} | {e2e_cells(p)} |"
      )
    lines.append("")
  lines += host_note(result)
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
        + (
            f"; refused by the compiler ({r['facts']['refused']})"
            if r["facts"].get("refused")
            else f"; XLA memory {_mib((r['facts']['memory'] or {}).get('footprint_bytes'))}"
            "/device"
        )
        + f"; compile {r['facts']['compile_s']:.1f} s"
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
    shown = False  # any images/s in this column (none where no step fits)
    for system in dict.fromkeys(p["system"] for p in ps):
      sel = sorted(
          (p for p in ps if (p["mode"], p["scaling"], p["system"]) == (mode, scaling, system)),
          key=lambda p: p["devices"],
      )
      if not sel:
        continue
      xs = [p["devices"] for p in sel]
      ips = [np.nan if p["images_per_s"] is None else p["images_per_s"] for p in sel]
      line = axes[0, col].plot(xs, ips, "o-", label=system)[0]  # a step that does not fit: none
      shown = shown or not all(np.isnan(ips))
      effs = [p["efficiency"] for p in sel]
      if any(e is not None for e in effs):  # none without a 1-device row (a TPU study from 4)
        axes[1, col].plot(xs, [np.nan if e is None else e for e in effs], "o-", label=system)
      meas = [(p["devices"], p["measured_images_per_s"]) for p in sel if "measured_step_s" in p]
      if meas:
        axes[0, col].plot(*zip(*meas), "x", ms=10, color=line.get_color(), label="CPU measured")
    axes[0, col].set_title(f"{mode}, {scaling}", fontsize=9)
    if not shown:
      axes[0, col].text(0.5, 0.5, "no step fits", ha="center", transform=axes[0, col].transAxes)
      continue
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
  with fileio.atomic_write(path, "wb") as f:  # complete or not there
    fig.savefig(f, format="png", dpi=100)
  plt.close(fig)


def forms_rows(results: dict[str, dict]) -> list[dict]:
  """The studies of several `train.parallelism` forms ({form: result}) as one row per form
  and compiled step: per device (per chip on a TPU target) memory, bytes accessed, the
  collectives, the compile time, whether the step fits the study's first system and its
  projected images/s there (None where it does not fit)."""
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
          "fits": p.get("fits"),
          "does_not_fit": p.get("does_not_fit"),
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
      "| collectives | fits | images/s | vs jit | binding |",
      "|---|---|---:|---:|---:|---:|---:|---|---|---:|---:|---|",
  ]
  for r in sorted(rows_, key=lambda r: (r["mode"], r["count"], r["global_batch"])):
    base = jit.get((r["mode"], r["count"], r["global_batch"]))
    ips = r["images_per_s"]
    lines.append(
        f"| {r['mode']} | {r['form']} | {r['count']} | {r['global_batch']} | "
        f"{r['compile_s']:.1f} | {_f(r['footprint_bytes'] and r['footprint_bytes'] / 1e9, 3)} | "
        f"{_f(r['bytes_accessed'] and r['bytes_accessed'] / 1e9, 3)} | "
        f"{collectives_text(r['collectives'])} | {fits_text(r)} | "
        f"{images_text(r) if r['fits'] is False else _f(ips, 1)} | "
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


def check_out(out: str | None, forms: Sequence[str]) -> None:
  """--out, before any work: a folder that is or can be made (with its folder per form when
  there are several), where a file can be written and no output's name is taken by a folder;
  else one message naming --out and the fix (`fs.writable_dir`, which makes the folders)."""
  fix = "name a folder (new or existing) for scaling.json, scaling.md and scaling.png"
  if not out:
    raise errors.UserValueError(f"--out is empty: {fix}")
  fs.writable_dir(out, "--out", fix)
  studies = [out] if len(forms) < 2 else [os.path.join(out, form) for form in forms]
  files = [
      os.path.join(d, n) for d in studies for n in ("scaling.json", "scaling.md", "scaling.png")
  ]
  if len(forms) >= 2:
    files += [os.path.join(out, "forms.json"), os.path.join(out, "forms.md")]
    for form, folder in zip(forms, studies):
      fs.writable_dir(folder, f"--out's folder of the {form} form", fix)
  for file in files:
    if os.path.isdir(file):
      raise errors.UserValueError(
          f"--out={out}: {file} is a folder, where the study writes a file: remove it or name "
          "another --out"
      )


def write_study(result: dict, md: str, out: str, written: list[str]) -> str:
  """scaling.json, scaling.md and scaling.png of a study into `out`, each atomically (whole
  or not there; `written` gets each as it is) -> the markdown."""
  path = os.path.join(out, "scaling.json")
  fileio.atomic_write_json(path, result, indent=1)
  written.append(path)
  path = os.path.join(out, "scaling.md")
  fileio.atomic_write_text(path, md)
  written.append(path)
  path = os.path.join(out, "scaling.png")
  plot(result, path)
  written.append(path)
  return md


def written_text(written: list[str]) -> str:
  if not written:
    return "nothing written (a study's files are written once all its steps are compiled)"
  return "written: " + ", ".join(written)


def model_text(config, args) -> str:
  return (
      f"{config.model.backbone} {config.data.crop}px {config.model.dtype}, "
      f"D={config.model.embed_dim}, K={args.num_classes}, kernels={config.model.kernels}, "
      f"parallelism={config.train.parallelism}"
  )
