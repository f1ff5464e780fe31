#!/usr/bin/env python
"""Scaling model of the CRAS steps from their compiled programs (docs/performance.md).

For every device count (simulated on a CPU host: one subprocess per count with
`--xla_force_host_platform_device_count=N`; real devices on a GPU/TPU host) it compiles the
sharded training step, the training step on stored features and the scoring step, reads from
each compiled program XLA's FLOPs and bytes per device, its memory per device and every
collective with its operand bytes (cras_jax/perf/hlo.py), and projects the step on the named
systems of cras_jax/perf/systems.py and on this machine (its matmul peak and memory bandwidth
measured in the same run) as a roofline (cras_jax/perf/roofline.py): images/s, scaling
efficiency against one device, the binding resource, the input rate needed. Weak scaling:
`--batch_per_device`; strong scaling: `--global_batch`. The counts in `--measure` are also
timed, and the measured step is compared with this machine's projection (the calibration).

With `--target=tpu:<generation>` (v4, v5e, v5p, v6e, tpu7x) the steps are compiled instead by
libtpu for that generation's topology of each chip count in `--devices`, on this host without a
TPU (requirements-tpu-compile.txt; cras_jax/perf/target_study.py): `--batch_per_device` is then
images per chip, nothing is timed, and the projection is on that chip; `--max_batch` adds the
largest batch per chip whose compiled memory fits its HBM (more compiles). With
`--target=gpu:h100` (or `gpu:h200`) the same is done for NVIDIA GPUs by JAX's CUDA plugin
(requirements-gpu-compile.txt; cras_jax/perf/gpu.py), no GPU or CUDA needed; the GPU compiler
gives no FLOPs or bytes accessed, so those are `--cost_from`'s (XLA:CPU's by default) for the
same step at the same batch per GPU, and the tables say so.

Every projected row says whether the step's compiled memory fits the system's (HBM per chip or
GPU; this host's available memory for its simulated devices together); a row that does not
fit (or that the compiler refused for memory) has no images/s. Writes scaling.json, scaling.md
and scaling.png into --out (each whole or not at all); Ctrl-C stops after the current compile
(status 130) and says what was written. Examples:
  python -m cras_jax.scaling --config=configs/mvtec.py --devices=1,2,4,8 \\
      --batch_per_device=8 --global_batch=32 --out=runs/scaling
  python -m cras_jax.scaling --config=configs/mvtec.py --target=tpu:v5e --devices=4,16 \\
      --batch_per_device=32 --dtype=bfloat16 --out=runs/scaling_v5e
  python -m cras_jax.scaling --config=configs/mvtec.py --target=gpu:h100 --devices=1,8 \\
      --batch_per_device=32 --dtype=bfloat16 --out=runs/scaling_h100
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
import signal
import subprocess
import sys
import types
from collections.abc import Sequence

import jax
from absl import app, flags
from ml_collections import config_flags

from cras_jax import configs
from cras_jax.base import errors, fileio, stop
from cras_jax.config import bounds
from cras_jax.engine import sharding
from cras_jax.perf import (
    probes,
    rows,
    scaling_model,
    scaling_report,
    systems,
    target_study,
    targets,
    tpu,
)

MODES = rows.MODES


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  fv = flag_values
  configs.define_config_flag(  # a shipped config by name too; a file's config filled
      "config", "configs/mvtec.py", "Config file.", flag_values=fv, lock_config=True
  )
  flags.DEFINE_string("out", None, "Output directory.", flag_values=fv)
  flags.DEFINE_list("devices", ["1", "2", "4", "8"], "Device counts.", flag_values=fv)
  flags.DEFINE_list("batch_per_device", ["8"], "Weak scaling: batch per device.", flag_values=fv)
  flags.DEFINE_list("global_batch", [], "Strong scaling: global batch sizes.", flag_values=fv)
  flags.DEFINE_list("modes", list(MODES), f"Steps, of {MODES}.", flag_values=fv)
  flags.DEFINE_string("dtype", None, "config.model.dtype (default: the config's).", flag_values=fv)
  flags.DEFINE_integer(
      "image_size", None, "config.data.crop (default: the config's).", flag_values=fv
  )
  flags.DEFINE_string("backbone", None, "Override config.model.backbone.", flag_values=fv)
  flags.DEFINE_integer("embed_dim", None, "Override config.model.embed_dim.", flag_values=fv)
  flags.DEFINE_integer("pre_embed_dim", None, "Override model.pre_embed_dim.", flag_values=fv)
  flags.DEFINE_integer(
      "num_classes", 0, "Class centres K (default: the config's, or 4).", flag_values=fv
  )
  flags.DEFINE_list("measure", ["1"], "Device counts also timed (calibration).", flag_values=fv)
  flags.DEFINE_integer("reps", 3, "Timed repetitions of a measured step.", flag_values=fv)
  flags.DEFINE_float(
      "loader_images_per_s", 0.0,
      "The loader's images/s (cras_jax.benchmark --loader); projections faster are flagged.",
      flag_values=fv,
  )  # fmt: skip
  flags.DEFINE_float(
      "loader_images_per_s_per_worker", 0.0,
      "End to end: one image-reader worker's images/s at this crop (cras_jax.benchmark's loader"
      " table); 0: the development CPU's rate per byte (scaling_model.MEASURED_HOST).",
      flag_values=fv,
  )  # fmt: skip
  flags.DEFINE_float(
      "gather_images_per_s", 0.0,
      "End to end: images/s of the stored features' gather in the prefetch thread (one per "
      "host; the benchmark's train_cached loop row, 'loader alone'); 0: the development CPU's "
      "rate per byte.",
      flag_values=fv,
  )  # fmt: skip
  flags.DEFINE_float(
      "dispatch_ms", 0.0,
      "End to end: the training loop thread's work per step, ms (the benchmark's loop rows: "
      "dispatch + log per step); 0: the development CPU's for WRN50-2 (per mode).",
      flag_values=fv,
  )  # fmt: skip
  flags.DEFINE_integer(
      "loader_workers_per_host", 0,
      "End to end: image-reader workers per host (data.workers); 0: one per host thread of "
      "each system (systems.py). data.workers=0 in a run means at most 8.",
      flag_values=fv,
  )  # fmt: skip
  flags.DEFINE_string(
      "target", "cpu",
      "'cpu': this host's devices (simulated on a CPU); 'tpu:<generation>' (v4, v5e, v5p, v6e, "
      "tpu7x): compile for that TPU with libtpu on this host, --devices counting chips; "
      "'gpu:<kind>' (h100, h200): compile for those NVIDIA GPUs with JAX's CUDA plugin on this "
      "host, --devices counting GPUs.",
      flag_values=fv,
  )  # fmt: skip
  flags.DEFINE_string(
      "cost_from", "cpu",
      "GPU targets: whose cost analysis gives the FLOPs and bytes accessed per GPU (the GPU "
      "compiler gives none), for the same step at the same batch per GPU: 'cpu' (XLA:CPU) or "
      "'tpu:<generation>' (libtpu, one chip).",
      flag_values=fv,
  )  # fmt: skip
  flags.DEFINE_boolean(
      "max_batch", False,
      "TPU and GPU targets: also find the largest batch per chip whose compiled memory fits "
      "the chip's HBM (bisection over compiled batch sizes; about 2 log2(batch) compiles per "
      "step).",
      flag_values=fv,
  )  # fmt: skip
  flags.DEFINE_integer(
      "max_batch_multiple", 8, "--max_batch: batches per device searched in this step.",
      flag_values=fv,
  )  # fmt: skip
  flags.DEFINE_list(
      "parallelism", ["jit"],
      "Forms of the steps (train.parallelism): jit, shard_map, pmap. With several, one study "
      "per form in OUT/<form>/ and the forms side by side in OUT/forms.md (and .json).",
      flag_values=fv,
  )  # fmt: skip
  flags.DEFINE_integer(
      "train_images", 3629, "TPU and GPU targets: the training set of the data.on_device table "
      "(default: MVTec AD's 3,629 images).", lower_bound=1, flag_values=fv,
  )  # fmt: skip
  flags.DEFINE_integer("worker_devices", 0, "Internal: run one device count.", flag_values=fv)
  flags.mark_flag_as_required("out", flag_values=fv)
  flags.register_validator(
      "parallelism",
      lambda fs: bool(fs) and set(fs) <= set(sharding.FORMS),
      f"--parallelism: one or more of {', '.join(sharding.FORMS)}",
      flag_values=fv,
  )
  flags.register_validator(
      "modes", lambda ms: set(ms) <= set(MODES), f"--modes: each one of {MODES}", flag_values=fv
  )


def _ints(values) -> list[int]:
  try:
    out = [int(v) for v in values]
  except ValueError as e:
    raise errors.UserError(f"expected comma-separated integers, got {values}") from e
  if any(v < 1 for v in out):
    raise errors.UserError(f"device counts and batch sizes must be >= 1, got {values}")
  return out


def options(fv: flags.FlagValues):
  base = fv.config
  args = types.SimpleNamespace(
      out=fv.out, modes=list(fv.modes), reps=fv.reps, backbone=fv.backbone,
      embed_dim=fv.embed_dim, pre_embed_dim=fv.pre_embed_dim, levels=None, weights="random",
      num_classes=fv.num_classes or len(base.data.classes) or 4,
      devices=_ints(fv.devices), measure=_ints(fv.measure),
      batch_per_device=_ints(fv.batch_per_device), global_batch=_ints(fv.global_batch),
  )  # fmt: skip
  dtype = fv.dtype or base.model.dtype
  config = rows.configure(base, args, fv.image_size or int(base.data.crop), dtype)
  args.target = targets.parse(fv.target)
  if args.target and config.model.kernels == "auto":
    config.model.kernels = "xla"  # what "auto" gives on a TPU or GPU (this host's is the CPU)
  plan = scaling_model.series(args.devices, args.batch_per_device, args.global_batch)
  return args, config, plan


def _worker(fv, args, config, plan) -> None:
  n = fv.worker_devices
  out = scaling_model.run_count(config, args, n, plan, measure=n in args.measure)
  fileio.atomic_write_json(os.path.join(args.out, f"worker_{n}.json"), out, indent=None)


def _counts(args, platform: str) -> tuple[list[dict], bool]:
  """Every device count's compiled (and measured) steps: in subprocesses of simulated CPU
  devices, or here on the real devices."""
  if platform != "cpu":
    have = len(jax.devices())
    out = []
    for n in args.devices:
      if n <= have:
        out += scaling_model.run_count(args.config, args, n, args.plan, n in args.measure)
      else:
        print(f"skip {n} devices: {have} here", flush=True)
    return out, False
  out = []
  for n in args.devices:
    tpu.boundary(f"the worker compiling on {n} simulated device(s)")
    cmd = [sys.executable, "-m", "cras_jax.scaling", *sys.argv[1:], f"--worker_devices={n}"]
    # This form's study (the last of a repeated flag wins).
    cmd += [f"--parallelism={args.config.train.parallelism}", f"--out={args.out}"]
    print(f"--- {n} simulated device(s)", flush=True)
    path = os.path.join(args.out, f"worker_{n}.json")
    try:
      status = _run_worker(cmd, scaling_model.worker_env(n))
      tpu.stop_if_requested(f"during {tpu.doing()}")
      if status == errors.USER_ERROR_STATUS:
        raise SystemExit(status)  # the worker printed the message
      if status != 0:
        raise RuntimeError(
            f"the worker compiling on {n} simulated device(s) failed (exit status {status}); "
            "its output is above"
        )
      with open(path) as f:
        out += json.load(f)
    finally:  # the worker's file is the parent's to read once, kept by no outcome
      for leftover in [
          path,
          *glob.glob(os.path.join(glob.escape(args.out), f".worker_{n}.json.*.tmp")),
      ]:
        if os.path.exists(leftover):
          os.remove(leftover)
  return out, True


def _run_worker(cmd: list[str], env: dict) -> int:
  """Runs a worker process to its end -> its exit status. The worker has a session of its
  own (a Ctrl-C at the terminal reaches this process alone): when this process is asked to
  stop (SIGINT/SIGTERM inside a `stop.StopRequest`) the worker is terminated at once (it
  writes nothing until its end, and that atomically); when this process leaves early
  (a second signal, an error), the worker is killed."""
  proc = subprocess.Popen(cmd, env=env, start_new_session=True)
  terminated = False
  try:
    while True:
      try:
        return proc.wait(timeout=0.25)
      except subprocess.TimeoutExpired:
        if stop.requested() is not None and not terminated:
          proc.terminate()
          terminated = True
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def run(fv: flags.FlagValues, written: list[str] | None = None) -> dict:
  """The study of each form in --parallelism (one: in --out; several: in --out/<form>/, and
  their comparison in --out/forms.md). `written` collects the files written, as they are."""
  written = [] if written is None else written
  forms = list(dict.fromkeys(fv.parallelism))
  if not fv.worker_devices:
    scaling_report.check_out(fv.out, forms)
  if len(forms) == 1 or fv.worker_devices:
    return _run_form(fv, forms[0], fv.out, written)
  results = {form: _run_form(fv, form, os.path.join(fv.out, form), written) for form in forms}
  table = scaling_report.forms_markdown(results)
  path = os.path.join(fv.out, "forms.json")
  fileio.atomic_write_json(path, scaling_report.forms_rows(results), indent=1)
  written.append(path)
  path = os.path.join(fv.out, "forms.md")
  fileio.atomic_write_text(path, table)
  written.append(path)
  print("\n" + table, flush=True)
  return {"forms": results}


def _run_form(fv: flags.FlagValues, form: str, out: str, written: list[str]) -> dict:
  args, config, plan = options(fv)
  args.out = out
  config.train.parallelism = form
  os.makedirs(args.out, exist_ok=True)  # check_out made it; a worker's is its parent's
  if args.target:
    return _run_target(fv, args, config, plan, written)
  if fv.worker_devices:
    _worker(fv, args, config, plan)
    return {}
  tpu.boundary("measuring this host's matmul peak and memory bandwidth")
  env = probes.environment()
  devs = jax.devices()
  peak, bw = _calibration(devs[0])
  here = systems.measured_system(
      "this CPU" if devs[0].platform == "cpu" else f"this {devs[0].device_kind}",
      peak["flops_per_s"], bw["bytes_per_s"], shared=devs[0].platform == "cpu",
      host_threads=os.cpu_count(),
  )  # fmt: skip
  print(
      f"calibration: matmul {peak['flops_per_s'] / 1e9:.1f} GFLOP/s, memory "
      f"{bw['bytes_per_s'] / 1e9:.1f} GB/s",
      flush=True,
  )
  args.config, args.plan = config, plan
  # what this machine's own system has for the steps: the host's available memory (shared by
  # its simulated devices), or a real device's memory
  local_memory = bounds.available_memory()
  compiled, simulated = _counts(args, devs[0].platform)
  system_list = (here, *systems.NAMED)
  loader = fv.loader_images_per_s or None
  feeds = _feeds(fv, config, args)
  projections = scaling_model.project_all(
      compiled, plan, system_list, config.model.dtype, loader, local_memory, feeds
  )
  result = {
      "config": config_flags.get_config_filename(fv["config"]),
      "model": scaling_report.model_text(config, args),
      "parallelism": config.train.parallelism,
      "environment": env,
      "simulated": simulated,
      "modes": args.modes,
      "calibration": {
          "matmul_flops_per_s": peak["flops_per_s"],
          "memory_bytes_per_s": bw["bytes_per_s"],
          "measured_over_projected": {
              f"{p['mode']} {p['devices']} dev batch {p['global_batch']}": p[
                  "measured_over_projected"
              ]
              for p in projections
              if "measured_over_projected" in p
          },
      },
      "optimiser_note": scaling_model.OPTIMISER_NOTE,
      "loader_images_per_s": loader,
      "host_memory": {"bytes": local_memory[0], "what": local_memory[1]},
      "host_feeds": {m: dataclasses.asdict(f) for m, f in feeds.items()},
      "systems": [_system_record(s) for s in system_list],
      "compiled": compiled,
      "projections": projections,
  }
  md = scaling_report.write_study(result, scaling_report.markdown(result), args.out, written)
  for k, v in result["calibration"]["measured_over_projected"].items():
    print(f"calibration {k}: measured / projected = {v:.2f}", flush=True)
  print("\n" + md, flush=True)
  return result


def _feeds(fv: flags.FlagValues, config, args) -> dict:
  """The training modes' host feeds of the end-to-end projection (scaling_model.host_feeds)."""
  return scaling_model.host_feeds(
      config, args.num_classes, args.modes, fv.loader_images_per_s_per_worker,
      fv.gather_images_per_s, fv.dispatch_ms / 1e3, fv.loader_workers_per_host,
  )  # fmt: skip


def _system_record(s: systems.System) -> dict:
  return {
      "name": s.name,
      "source": s.source,
      "host_link_gb_s": s.host_link_gb_s,
      "host_threads": s.host_threads,
      "chips_per_host": s.chips_per_host,
      "host_source": s.host_source,
  }


@functools.cache
def _calibration(device) -> tuple[dict, dict]:
  """This host's matmul peak and memory bandwidth, measured once per process (the forms of
  one study are projected on the same figures, so they compare by their programs alone)."""
  peak = probes.matmul_peak([device], 2048 if device.platform == "cpu" else 8192, "float32", 3, 0.3)
  return peak, probes.memory_bandwidth(device)


def _run_target(fv: flags.FlagValues, args, config, plan, written: list[str]) -> dict:
  """--target=tpu:<generation> or gpu:<kind>: compile-only on this host
  (cras_jax/perf/target_study.py)."""
  target = args.target
  compiled = target_study.compile_counts(
      args, config, plan, target, fv.max_batch, fv.max_batch_multiple, fv.cost_from
  )
  loader = fv.loader_images_per_s or None
  chip = target.chip
  feeds = _feeds(fv, config, args)
  result = {
      "config": config_flags.get_config_filename(fv["config"]),
      "model": scaling_report.model_text(config, args),
      "parallelism": config.train.parallelism,
      "target": target.spec,
      "compiler": target.compiler(),
      # where the FLOPs and bytes accessed came from (a GPU compiler gives none)
      "cost_source": "; ".join(
          sorted({r["facts"]["cost_source"] for r in compiled if "refused" not in r["facts"]})
      ),
      **({"libtpu": tpu.libtpu_version()} if target.platform == "tpu" else {}),
      "environment": probes.environment(),
      "simulated": False,
      "modes": args.modes,
      "optimiser_note": scaling_model.OPTIMISER_NOTE,
      "loader_images_per_s": loader,
      "host_feeds": {m: dataclasses.asdict(f) for m, f in feeds.items()},
      "systems": [_system_record(chip)],
      "compiled": compiled,
      "projections": target_study.project(compiled, plan, chip, config.model.dtype, loader, feeds),
      "train_images": fv.train_images,
  }
  md = scaling_report.write_study(result, target_study.markdown(result), args.out, written)
  print("\n" + md, flush=True)
  return result


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> int:
  """The command. SIGINT/SIGTERM stop it at the next compile boundary (a second one at
  once): one line, "stopped: <signal> <where>; <what was written>", and status 128 + the
  signal (130 for Ctrl-C). Every file is written atomically: a stop leaves none half-written."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if flag_values.worker_devices:
    run(flag_values)  # a worker: its parent terminates it on a stop, and reports
    return 0
  written: list[str] = []
  request = stop.StopRequest("the current compile")
  try:
    with request:
      run(flag_values, written)
      tpu.stop_if_requested("after the last step")  # a signal during the writes: all written
  except (stop.Stopped, KeyboardInterrupt) as e:
    signum = getattr(e, "signum", None) or request.signum or signal.SIGINT
    where = getattr(e, "where", None) or f"during {tpu.doing()}"
    print(
        f"stopped: {signal.Signals(signum).name} {where}; {scaling_report.written_text(written)}",
        file=sys.stderr,
        flush=True,
    )
    raise SystemExit(128 + signum) from None
  return 0
