"""The benchmark's report (cras_jax/benchmark.py): its markdown table and its figure."""

from __future__ import annotations

from cras_jax.perf import probes
from cras_jax.perf.rows import MODES


def fmt(x, scale=1.0, digits=1):
  if x is None:
    return "–"
  v = x / scale
  if digits == 1 and abs(v) < 10:
    digits = 2  # small values: keep two significant figures or so
  return f"{v:.{digits}f}"


def _mode(row: dict) -> str:
  """The row's mode, with its parallelism form where that is not jit."""
  form = row.get("parallelism", "jit")
  return row["mode"] if form == "jit" else f"{row['mode']} ({form})"


def peak_text(r: dict) -> str:
  """A row's peak memory: its devices' (memory_stats), or where they report none (the CPU) the
  process's peak RSS so far, marked "RSS"."""
  if r.get("device_peak_bytes") is not None:
    return fmt(r["device_peak_bytes"], 2**20, 0)
  rss = r.get("process_peak_rss_bytes")
  return "–" if rss is None else f"{fmt(rss, 2**20, 0)} RSS"


def collectives_text(collectives: dict) -> str:
  """{kind: {count, operand_bytes}} -> "all-reduce 2× 1.3 MB" (per device, summed operands)."""
  parts = [
      f"{k} {v['count']}× {v['operand_bytes'] / 1e6:.3g} MB"
      for k, v in sorted((collectives or {}).items())
  ]
  return ", ".join(parts) or "none"


def forms_table(rows: list[dict]) -> list[str]:
  """Where the rows hold more than one `train.parallelism` form: the forms side by side, with
  the images/s relative to the jit form of the same mode, devices and batch (same run)."""
  if len({r.get("parallelism", "jit") for r in rows}) < 2:
    return []
  jit = {
      (r["mode"], r["devices"], r["batch_size"], r["image_size"], r["dtype"]): r["images_per_s"]
      for r in rows
      if r.get("parallelism", "jit") == "jit"
  }
  lines = [
      "",
      "Parallelism forms (train.parallelism; collectives per device and step, from the compiled "
      "HLO: count × operand bytes summed):",
      "",
      "| mode | form | dev | batch | compile s | images/s | vs jit | XLA mem MiB | collectives |",
      "|---|---|---:|---:|---:|---:|---:|---:|---|",
  ]
  for r in rows:
    base = jit.get((r["mode"], r["devices"], r["batch_size"], r["image_size"], r["dtype"]))
    lines.append(
        f"| {r['mode']} | {r.get('parallelism', 'jit')} | {r['devices']} | {r['batch_size']} | "
        f"{fmt(r['lower_and_compile_s'], digits=2)} | {r['images_per_s']:.2f} | "
        f"{fmt(r['images_per_s'] / base if base else None, digits=2)} | "
        f"{fmt(r['xla_memory_bytes_per_device'], 2**20, 0)} | "
        f"{collectives_text(r.get('collectives'))} |"
    )
  return lines


def _source(r: dict) -> str:
  """Where a loop row's batches came from: the devices (data.on_device), the reader's workers,
  or the memory-mapped feature cache."""
  if r.get("on_device"):
    return "devices"
  return f"{r['reader_workers']} reader workers" if r["reader_workers"] else "feature cache"


def loop_table(loop_rows: list[dict]) -> list[str]:
  """The training loop end to end (cras_jax/perf/loop_probe.py) beside the step alone."""
  if not loop_rows:
    return []
  lines = [
      "",
      "Training loop, end to end (loop.run_steps: batches through the prefetch thread, the "
      "step, the NaN check and log every train.log_every steps), beside the step alone:",
      "",
      "| mode | backbone | image | dtype | dev | batch | batches from | steps × reps "
      "| loop ms/step median [min–max] | loop images/s | step-only images/s | loop / step "
      "| device waits for the host, % median [min–max] | 1 − step/loop % | dispatch ms "
      "| log + check ms/step | batch wait ms/step | loader alone images/s | load avg |",
      "|---|---|---:|---|---:|---:|---:|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|",
  ]
  for r in loop_rows:
    step = f"{r['median_s'] * 1e3:.1f} [{r['min_s'] * 1e3:.1f}–{r['max_s'] * 1e3:.1f}]"
    share = (
        f"{r['host_share'] * 100:.1f} [{r['host_share_min'] * 100:.1f}–"
        f"{r['host_share_max'] * 100:.1f}]"
    )
    lines.append(
        f"| loop: {_mode(r)} | {r['backbone']} | {r['image_size']} | {r['dtype']} | "
        f"{r['devices']} | {r['batch_size']} | {_source(r)} | {r['steps_per_rep']} × {r['reps']} "
        f"| {step} | {r['images_per_s']:.2f} | {fmt(r.get('step_only_images_per_s'))} | "
        f"{fmt(r.get('loop_over_step'), digits=2)} | {share} | "
        f"{fmt(r.get('host_share_implied'), 0.01)} | {fmt(r['dispatch_s'], 1e-3, 2)} | "
        f"{fmt(r['log_s_per_step'] + r['check_s_per_step'], 1e-3, 2)} | "
        f"{fmt(r['next_wait_s_per_step'], 1e-3, 2)} | {fmt(r['producer_alone_images_per_s'])} | "
        f"{fmt(r['loadavg_1min_start'])}–{fmt(r['loadavg_1min_end'])} |"
    )
  lines += [
      "",
      "The device waits for the host before a step for the time from the previous step's "
      "result being ready to this step's dispatch returning (summed over a rep, over the "
      "rep's wall time); 1 − step/loop: the same share implied by the step alone's time. "
      "dispatch: the median call of the jitted step; log + check: the hooks' time per step; "
      "batch wait: the loop thread's wait for the next batch per step; loader alone: the "
      "batches' production (read or gather, and the transfer) with no step running. Batches "
      "from the devices: data.on_device put the training set there, each batch gathered by "
      "index.",
  ]
  return lines


def markdown(result: dict) -> str:
  lines = [
      f"Benchmark: {result['config']} on {result['environment']['device_count']} x "
      f"{result['environment']['device_kind']} ({result['environment']['platform']}), "
      f"jax {result['environment']['jax']}; {result['rows'][0]['reps'] if result['rows'] else 0}"
      f" reps; step time median [min–max]; FLOPs from XLA's cost analysis; CPU s/s: this "
      f"process's CPU seconds per wall second while timed ({result['environment']['cpu_count']}"
      f" host CPUs, 1-min load average {fmt(result['environment']['loadavg_1min'])} at the start)"
      "; ms/image: the step over its batch (at batch 1, the latency per image); peak mem: the "
      "devices' peak, or on the CPU this process's peak RSS so far (one row per process gives "
      "each row its own).",
      "",
      "| mode | backbone | image | D | dtype | dev | batch | compile s | step ms median [min–max]"
      " | ms/image | images/s | GFLOP/step | achieved GFLOP/s | f32 matmul GFLOP/s | % of peak "
      "| XLA mem MiB | peak mem MiB | CPU s/s | backbone % | adapter+matching % | discriminator %"
      " | other % | matmul ops % |",
      "|---|---|---:|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
      "---:|---:|---:|---:|---:|",
  ]
  for r in result["rows"]:
    step = f"{r['median_s'] * 1e3:.1f} [{r['min_s'] * 1e3:.1f}–{r['max_s'] * 1e3:.1f}]"
    compile_s = fmt(r["lower_and_compile_s"], digits=2) + (
        " (cache)" if r["compile_cache_hit"] else ""
    )
    lines.append(
        f"| {_mode(r)} | {r['backbone']} | {r['image_size']} | {r['embed_dim']} | {r['dtype']} | "
        f"{r['devices']} | {r['batch_size']} | {compile_s} | {step} | "
        f"{fmt(r.get('ms_per_image'))} | "
        f"{r['images_per_s']:.2f} | {fmt(r['flops_per_step'], 1e9)} | "
        f"{fmt(r['achieved_flops_per_s'], 1e9)} | {fmt(r['peak_flops_per_s_f32'], 1e9)} | "
        f"{fmt(r['ratio_to_peak_f32'], 0.01)} | {fmt(r['xla_memory_bytes_per_device'], 2**20, 0)} | "
        f"{peak_text(r)} | {fmt(r['process_cpu_per_wall_s'])} | "
        + " | ".join(
            fmt(sh.get(k) if (sh := r.get("stage_shares")) else None, 0.01, 0)
            for k in probes.STAGE_NAMES
        )
        + f" | {fmt(r.get('matmul_time_share'), 0.01, 0)} |"
    )
  lines += forms_table(result["rows"])
  peaks = result["matmul_peaks"]
  if peaks:
    lines += [
        "",
        "Peak matmul (n x n @ n x n, rows split over the devices, best rep): "
        + "; ".join(
            f"{p['devices']} dev {p['dtype']} n={p['n']}: {p['flops_per_s'] / 1e9:.1f} GFLOP/s"
            for p in peaks
        ),
    ]
  if any(r.get("stage_shares") for r in result["rows"]):
    lines += [
        "",
        "Stage shares: of the summed time of the step's ops in a profile (ops running "
        "at once on several threads all count): backbone = frozen backbone and patch "
        "aggregation; adapter+matching = adapter, global and local matching; "
        "discriminator = discriminator and loss; other = noise, DAFS, optimiser, "
        "anomaly map. matmul ops: the share of that time in matrix products and "
        "convolutions, where nearly all of XLA's FLOPs are; the rest is elementwise and "
        "data-movement work (BatchNorm, activations, unfolding, pooling, argmax, noise).",
    ]
  lines += loop_table(result.get("loop") or [])
  if result.get("loader"):
    steps = {
        (r["image_size"], r["mode"]): r["images_per_s"] for r in result["rows"] if r["devices"] == 1
    }
    lines += ["", "Loader (prepared dataset or stored features -> device batch):", ""]
    for r in result["loader"]:
      beside = ", ".join(
          f"{m} step {v:.1f}" for (size, m), v in sorted(steps.items()) if size == r["image_size"]
      )
      what = (
          f"stored features ({r['features']}, {r['bytes_per_image'] / 1e6:.3g} MB per image) "
          "gathered by one thread"
          if r.get("kind") == "gather"
          else f"{r['workers']} workers"
      )
      rate = r["images_per_s"] * r["bytes_per_image"] / 1e9 if r.get("bytes_per_image") else None
      lines.append(
          f"- {r['image_size']} px, batch {r['batch_size']}, {what}: "
          f"{r['images_per_s']:.0f} images/s"
          + (f" ({rate:.2f} GB/s)" if rate else "")
          + (f" (beside: {beside} images/s)" if beside else "")
      )
  for sk in result.get("skipped", []):
    lines += ["", f"skipped {sk['row']}: {sk['why']}"]
  bad = [r for r in result["rows"] if r["recompiles_during_timing"]]
  if bad:
    lines += ["", f"WARNING: {len(bad)} row(s) recompiled inside the timed loop."]
  return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
  import matplotlib  # here only: plotting, for the figure alone

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = result["rows"]
  modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
  by_batch = len({r["batch_size"] for r in rows}) > 1 or len({r["devices"] for r in rows}) == 1
  xkey, xlabel = ("batch_size", "batch size") if by_batch else ("devices", "device count")
  fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4), squeeze=False)
  for ax, mode in zip(axes[0], modes):
    groups: dict[tuple, list] = {}
    other = "devices" if by_batch else "batch_size"
    for r in rows:
      if r["mode"] != mode:
        continue
      key = (r["backbone"], r["image_size"], r["dtype"], other, r[other])
      groups.setdefault(key, []).append(r)
    for (bb, size, dtype, other, val), rs in sorted(groups.items(), key=str):
      rs = sorted(rs, key=lambda r: r[xkey])
      label = f"{bb} {size}px {dtype}, {'dev' if other == 'devices' else 'batch'} {val}"
      ax.plot([r[xkey] for r in rs], [r["images_per_s"] for r in rs], "o-", label=label)
      ax.errorbar(
          [r[xkey] for r in rs],
          [r["images_per_s"] for r in rs],
          yerr=[
              [r["images_per_s"] - r["batch_size"] / r["max_s"] for r in rs],
              [r["batch_size"] / r["min_s"] - r["images_per_s"] for r in rs],
          ],
          fmt="none",
          capsize=3,
          color=ax.lines[-1].get_color(),
      )
    ax.set_xscale("log", base=2)
    xs = sorted({r[xkey] for r in rows if r["mode"] == mode})
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("images/s (median, min–max)")
    ax.set_title(
        {
            "train": "training step",
            "train_cached": "training step (stored features)",
            "score": "scoring",
        }[mode]
    )
    ax.grid(alpha=0.3)
    top = max(r["batch_size"] / r["min_s"] for r in rows if r["mode"] == mode)
    ax.set_ylim(0, 1.25 * top)
    ax.legend(fontsize=7)
  env = result["environment"]
  fig.suptitle(f"{result['config']} on {env['device_kind']} ({env['platform']})", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
