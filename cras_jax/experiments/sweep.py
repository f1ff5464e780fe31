#!/usr/bin/env python
"""Runs a list of named runs (each a list of config overrides) into sub-workdirs, resumably.

Every run is `python -m cras_jax.main --config=<base> --workdir=<sweep_dir>/<name> <overrides>`,
started one after another as a subprocess. All runs share one prepared data cache
(`--config.data.cache_dir=<sweep_dir>/data_cache`) and, for the synthetic demo data, one
generated dataset (`--config.data.root=<sweep_dir>/data`), unless the overrides set them.

The runs come from a sweep file (`--sweep=configs/sweeps/ablations.py`: `get_sweep()` returns
an ordered dict name -> list of overrides; optional module attributes `BASE_CONFIG` and
`COMMON_OVERRIDES`) and/or `--run=name:override,override`. Overrides are written
`--config.model.hpi=False` or just `model.hpi=False`. Common overrides (applied to every run,
before the run's own) come from `--override=...` or from any `--config.x=y` argument given to
this tool directly.

Resuming: a run whose `results/metrics_final.json` is complete (parses, holds its metrics, step
and protocol: an empty or truncated one is redone) and whose recorded base config and
overrides (`<sweep_dir>/<name>/sweep_run.json`) equal the current ones is skipped; any other is
(re)started, and the trainer resumes from its checkpoint. A failing run is reported and the
sweep goes on with the next; the exit status is 1 if any run failed. Ctrl-C (or SIGTERM) is
passed to the running child, which checkpoints and exits; the sweep then stops (exit status
130 / 143) and the same command resumes it.

Seeds: `--seeds=N` repeats every run over N seeds (`experiments.sweep_plan.with_seeds`): as one
population run (`train.population=seed=...`: one process, one compile, the backbone once)
where the run allows it, else as N runs `<name>_seed<k>`; the seeds share the base seed's data
order or draw each their own as a population's members do (`train.member_data_order`); the
report shows mean ± std and what the seeds vary (`variance_sources`).

Examples (from the repository root):
  python -m cras_jax.sweep --sweep=configs/sweeps/ablations.py --sweep_dir=runs/ablations
  # shrink the demo, add a run, print the commands only
  python -m cras_jax.sweep --sweep=configs/sweeps/ablations.py --sweep_dir=runs/abl_small \\
      --config.train.epochs=5 --run=sigma_0.4:model.noise_sigma=0.4 --dry_run
  python -m cras_jax.report runs/ablations          # the table of the results
"""

from __future__ import annotations

import codecs
import datetime
import inspect
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence

from absl import app, flags

from cras_jax.base import errors, fileio
from cras_jax.experiments import sweep_plan
from cras_jax.experiments.sweep_plan import (  # noqa: F401 - the tool's names, as before the split
    _OVERRIDE,
    DEFAULT_CONFIG,
    RECORD,
    REPO_ROOT,
    RESULT,
    SWEEP_RECORD,
    find_config,
    is_done,
    load_sweep_module,
    normalise,
    override_key,
    override_value,
    parse_run_flag,
    plan,
    resolve_config,
    sweep_runs,
)

_read_json = sweep_plan.read_json


# ----------------------------------------------------------------------------- one run


class _Stop:
  """SIGINT/SIGTERM: remembered and passed on to the running child (once per signal)."""

  def __init__(self):
    self.signum = None
    self.child: subprocess.Popen | None = None
    self._old = {}

  def _handle(self, signum, frame):
    self.signum = signum
    print(
        f"\n[sweep] {signal.Signals(signum).name}: passing it to the running job and "
        f"stopping the sweep after it",
        flush=True,
    )
    if self.child is not None and self.child.poll() is None:
      self.child.send_signal(signum)

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)
    return False


def _now() -> str:
  return datetime.datetime.now().isoformat(timespec="seconds")


def _write_json(path, obj) -> None:
  fileio.atomic_write_json(path, obj)


def _stream(child: subprocess.Popen, log, out) -> None:
  """Copies the child's output to `out` and the log file as it comes."""
  decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
  fd = child.stdout.fileno()
  while True:
    chunk = os.read(fd, 65536)
    if not chunk:
      break
    log.write(chunk)
    log.flush()
    out.write(decoder.decode(chunk))
    out.flush()
  out.write(decoder.decode(b"", final=True))


def _eta(seconds: dict[str, float], remaining: Sequence[dict]) -> str:
  """How long the sweep has run and, after a first run, about how long the rest will take
  (the mean time of this sweep's runs so far, times the runs left, the done ones excluded)."""
  if not seconds:
    return ""
  left = sum(not is_done(e)[0] for e in remaining)
  mean = sum(seconds.values()) / len(seconds)
  return f" [{_clock(sum(seconds.values()))} so far, about {_clock(mean * left)} left]"


def _clock(s: float) -> str:
  m, s = divmod(int(round(s)), 60)
  return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


def _tail(path, n: int = 15) -> str:
  try:
    with open(path, "rb") as f:
      f.seek(max(0, os.path.getsize(path) - 20000))
      text = f.read().decode("utf-8", "replace").replace("\r", "\n")
  except OSError:
    return ""
  lines = [l for l in text.splitlines() if l.strip()]
  return "\n".join(lines[-n:])


# ----------------------------------------------------------------------------- the sweep


def run_sweep(
    runs: Mapping[str, Sequence[str]],
    sweep_dir: str,
    base_config: str = DEFAULT_CONFIG,
    common: Sequence[str] = (),
    *,
    launcher: Sequence[str] | None = None,
    dry_run: bool = False,
    out=None,
    env: Mapping[str, str] | None = None,
    groups: Mapping[str, str] | None = None,
) -> dict:
  """Runs the sweep; -> {"status": {name: done|skipped|failed|interrupted|not run},
  "returncode": 0 | 1 (failures) | 128 + signal (stopped), "failed": [names]}."""
  out = sys.stdout if out is None else out
  launcher = list(launcher or [sys.executable, "-m", "cras_jax.main"])
  entries = plan(runs, sweep_dir, base_config, common, launcher, groups)
  sweep_dir = os.path.abspath(sweep_dir)
  status: dict[str, str] = {}
  if dry_run:
    for e in entries:
      skip, why = is_done(e)
      print(
          f"# {e['name']}: {'skip (done)' if skip else why}"
          + (f"; config error: {e['config_error']}" if e["config_error"] else ""),
          file=out,
      )
      print(shlex.join(e["command"]), file=out)
      status[e["name"]] = "skipped" if skip else "not run"
    return {"status": status, "returncode": 0, "failed": []}

  os.makedirs(sweep_dir, exist_ok=True)
  old = _read_json(os.path.join(sweep_dir, SWEEP_RECORD)) or {}
  order = list(runs) + [n for n in old.get("runs", []) if n not in runs]
  _write_json(
      os.path.join(sweep_dir, SWEEP_RECORD),
      {
          "runs": order,
          "base_config": entries[0]["base_config"] if entries else base_config,
          "common_overrides": list(common),
          "updated": _now(),
      },
  )
  child_env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
  seconds: dict[str, float] = {}
  stopped = None
  with _Stop() as stop:
    for i, e in enumerate(entries):
      name = e["name"]
      if stop.signum is not None:
        stopped = stop.signum
        break
      skip, why = is_done(e)
      if skip:
        print(
            f"[sweep] {name} ({i + 1}/{len(entries)}): done already, skipped", file=out, flush=True
        )
        status[name] = "skipped"
        continue
      print(
          f"\n[sweep] {name} ({i + 1}/{len(entries)}): {why}{_eta(seconds, entries[i:])}\n"
          f"[sweep] {shlex.join(e['command'])}",
          file=out,
          flush=True,
      )
      os.makedirs(e["workdir"], exist_ok=True)
      record_path = os.path.join(e["workdir"], RECORD)
      prev = _read_json(record_path) or {}
      record = {
          k: e[k]
          for k in (
              "name",
              "command",
              "base_config",
              "overrides",
              "run_overrides",
              "common_overrides",
              "auto_overrides",
              "config",
              "config_error",
              "group",
          )
      }
      record.update(
          command_line=shlex.join(e["command"]),
          cwd=str(REPO_ROOT),
          status="running",
          started=_now(),
          attempts=prev.get("attempts", 0) + 1,
      )
      _write_json(record_path, record)
      t0 = time.time()
      log_path = os.path.join(e["workdir"], "sweep_log.txt")
      with open(log_path, "ab") as log:
        log.write(f"\n=== {_now()} {shlex.join(e['command'])}\n".encode())
        try:
          child = subprocess.Popen(
              e["command"],
              cwd=REPO_ROOT,
              env=child_env,
              stdout=subprocess.PIPE,
              stderr=subprocess.STDOUT,
              start_new_session=True,
          )  # Ctrl-C reaches it through us, once
        except OSError as err:
          child, rc = None, None
          log.write(f"could not start: {err}\n".encode())
        if child is not None:
          stop.child = child
          try:
            _stream(child, log, out)
          finally:
            rc = child.wait()
            stop.child = None
      seconds[name] = time.time() - t0
      if rc == 0:
        status[name] = "done"
      elif stop.signum is not None:
        status[name] = "interrupted"
      else:
        status[name] = "failed"
      record.update(
          status=status[name], returncode=rc, finished=_now(), seconds=round(seconds[name], 1)
      )
      _write_json(record_path, record)
      if status[name] == "failed":
        print(
            f"\n[sweep] {name} FAILED (exit status {rc}); log: {log_path}\n"
            f"{_tail(log_path)}\n[sweep] going on with the next run",
            file=out,
            flush=True,
        )
      if stop.signum is not None:
        stopped = stop.signum
        break
  for e in entries:
    status.setdefault(e["name"], "not run")
  failed = [n for n, s in status.items() if s == "failed"]
  print(f"\n[sweep] {sweep_dir}", file=out)
  for e in entries:
    n = e["name"]
    t = f" ({seconds[n]:.0f}s)" if n in seconds else ""
    print(f"  {n:<24} {status[n]}{t}", file=out)
  if stopped is not None:
    print(
        f"[sweep] stopped by {signal.Signals(stopped).name}; run the same command again to "
        f"resume",
        file=out,
    )
    rc = 128 + stopped
  elif failed:
    print(
        f"[sweep] {len(failed)} failed: {', '.join(failed)} (logs: <run>/sweep_log.txt); "
        f"run the same command again to retry them",
        file=out,
    )
    rc = 1
  else:
    print(f"[sweep] all done. Table: python -m cras_jax.report {shlex.quote(sweep_dir)}", file=out)
    rc = 0
  out.flush()
  return {"status": status, "returncode": rc, "failed": failed}


# ----------------------------------------------------------------------------- command line


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The tool's flags (defined when it runs as a command)."""
  fv = flag_values
  flags.DEFINE_string(
      "sweep_dir", None, "Directory of the runs (one sub-directory each).", flag_values=fv
  )
  flags.DEFINE_multi_string(
      "sweep", [], "Sweep file(s) with get_sweep() -> {name: [overrides]}.", flag_values=fv
  )
  flags.DEFINE_multi_string(
      "run",
      [],
      "A run NAME:OVERRIDE,OVERRIDE, e.g. "
      "wo_hpi:model.hpi=False (repeatable; after the sweep file's).",
      flag_values=fv,
  )
  flags.DEFINE_multi_string(
      "override",
      [],
      "Common override FIELD=VALUE for every run " "(repeatable); --config.x=y also works.",
      flag_values=fv,
  )
  flags.DEFINE_string(
      "config",
      None,
      "Base config file (default: the sweep file's " f"BASE_CONFIG, else {DEFAULT_CONFIG}).",
      flag_values=fv,
  )
  flags.DEFINE_list("only", [], "Run only these runs (comma-separated names).", flag_values=fv)
  flags.DEFINE_bool("dry_run", False, "Print the commands, run nothing.", flag_values=fv)
  flags.DEFINE_integer(
      "seeds",
      1,
      "Repeat every run over this many seeds (a population per run where the run allows it).",
      lower_bound=1,
      flag_values=fv,
  )
  flags.DEFINE_string(
      "main_module",
      "cras_jax.main",
      "Module run for each run (python -m MODULE); for tests.",
      flag_values=fv,
  )
  flags.mark_flag_as_required("sweep_dir", flag_values=fv)


def parse_flags(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """absl's parsing of the tool's flags, but `--config.x=y` (common overrides of every run,
  which name fields of the base config) are left in the returned argv, after the rest."""
  overrides = [a for a in argv[1:] if _OVERRIDE.match(a)]
  rest = [a for a in argv if not _OVERRIDE.match(a)]
  return [*flag_values(rest), *overrides]  # a bad flag: errors.parse_flags_or_exit, status 2


def main(
    argv: Sequence[str],
    flag_values: flags.FlagValues = flags.FLAGS,
    launcher: Sequence[str] | None = None,
    out=None,
) -> int:
  fv = flag_values
  direct = [a for a in argv[1:] if _OVERRIDE.match(a)]
  unexpected = [a for a in argv[1:] if not _OVERRIDE.match(a)]
  if unexpected:
    raise app.UsageError(f"Unexpected arguments: {unexpected}")
  common = [normalise(o) for o in fv.override] + direct
  base = fv.config
  runs: dict[str, list[str]] = {}
  modules = [load_sweep_module(path) for path in fv.sweep]
  for module in modules:
    if base is None and getattr(module, "BASE_CONFIG", None):
      base = module.BASE_CONFIG
    file_common = [normalise(o) for o in getattr(module, "COMMON_OVERRIDES", ())]
    common = file_common + [c for c in common if c not in file_common]
  base = base or DEFAULT_CONFIG
  for module in modules:
    probe = None
    if len(inspect.signature(module.get_sweep).parameters):
      probe = resolve_config(str(REPO_ROOT / find_config(base)), common)
    for name, ov in sweep_runs(module, probe).items():
      if name in runs:
        raise errors.UserValueError(f"run {name!r} is defined twice")
      runs[name] = ov
  for spec in fv.run:
    name, ov = parse_run_flag(spec)
    if name in runs:
      raise errors.UserValueError(f"run {name!r} is defined twice")
    runs[name] = ov
  if fv.only:
    only = [n.strip() for n in fv.only if n.strip()]
    missing = [n for n in only if n not in runs]
    if missing:
      raise errors.UserValueError(
          f"--only: no run named {', '.join(missing)} (runs: {', '.join(runs)})"
      )
    runs = {n: runs[n] for n in runs if n in only}
  if not runs:
    raise errors.UserValueError("no runs: give --sweep=FILE and/or --run=name:overrides")
  launcher = launcher or [sys.executable, "-m", fv.main_module]
  runs, groups = sweep_plan.with_seeds(runs, fv.seeds, base, common)
  result = run_sweep(
      runs,
      fv.sweep_dir,
      base,
      common,
      launcher=launcher,
      dry_run=fv.dry_run,
      out=out,
      groups=groups,
  )
  return result["returncode"]
