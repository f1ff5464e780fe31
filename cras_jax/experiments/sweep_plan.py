"""A sweep's plan: its runs' overrides, commands and workdirs, and which are done (no running).

Overrides are written `--config.model.hpi=False` or just `model.hpi=False`; `plan` turns named
runs into entries (workdir, command, resolved config) and `is_done` says which to skip.
`with_seeds` repeats every run over N seeds: one population run
(`train.population=seed=...`, `config.population`) where the run allows it, else N separate
runs `<name>_seed<k>`, grouped for the report; either way the seeds share the base seed's data
order or draw each their own, as a population's members would (`train.member_data_order`).
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from absl import flags

from cras_jax import configs
from cras_jax.base import errors, fileio
from cras_jax.config import population

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = "configs/demo.py"
RECORD = "sweep_run.json"  # per run: command, overrides, resolved config, status
SWEEP_RECORD = "sweep.json"  # per sweep: run order, base config, common overrides
RESULT = os.path.join("results", "metrics_final.json")
_OVERRIDE = re.compile(r"^--(?:no)?config\.([A-Za-z_][\w.]*)(?:=(.*))?$", re.S)
# A comma in --run starts a new override only when what follows looks like `field=`.
_SPLIT = re.compile(r",(?=\s*(?:--)?(?:config\.)?[A-Za-z_][\w.]*=)")
_NAME = re.compile(r"^[A-Za-z0-9][\w.+=-]*$")


def read_json(path) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


# ----------------------------------------------------------------------------- overrides


def normalise(override: str) -> str:
  """'model.hpi=False' / 'config.model.hpi=False' / '--config.model.hpi=False' ->
  '--config.model.hpi=False'. Other flags of cras_jax.main ('--allow_config_change') pass."""
  o = override.strip()
  if o.startswith("--"):
    return o
  if o.startswith("config."):
    return "--" + o
  if "=" in o:
    return "--config." + o
  raise errors.UserValueError(
      f"override {override!r}: write it as field=value, e.g. model.hpi=False"
  )


def override_key(override: str) -> str:
  """The config field an override sets ('model.hpi'), or the flag's name for other flags."""
  m = _OVERRIDE.match(override)
  if m:
    return m.group(1)
  return override[2:].split("=", 1)[0]


def override_value(override: str):
  """The value an override sets, parsed as a Python literal where possible."""
  m = _OVERRIDE.match(override)
  if not m:
    return None
  if m.group(2) is None:
    return not override.startswith("--noconfig.")
  try:
    return ast.literal_eval(m.group(2))
  except (ValueError, SyntaxError):
    return m.group(2)


def parse_run_flag(spec: str) -> tuple[str, list[str]]:
  """'name:model.hpi=False,model.levels=(2,3)' -> ('name', [...])."""
  name, sep, rest = spec.partition(":")
  if not sep:
    raise errors.UserValueError(
        f"--run={spec!r}: write it as name:override,override (or name: for none)"
    )
  rest = rest.strip()
  return name.strip(), [normalise(o) for o in _SPLIT.split(rest) if o.strip()] if rest else []


def resolve_config(config_path: str, overrides: Sequence[str]) -> dict:
  """The config cras_jax.main will build from the file and the overrides (as a dict).

  Raises on an unknown field or a bad value, like the trainer would."""
  argv = ["sweep", f"--config={config_path}", *[o for o in overrides if _OVERRIDE.match(o)]]
  fv = flags.FlagValues()
  configs.define_config_flag("config", None, "config file", flag_values=fv, sys_argv=argv)
  fv(argv)
  return json.loads(json.dumps(fv.config.to_dict(), default=str))


def load_sweep_module(path: str):
  """The sweep file as a module: get_sweep() (or get_sweep(config)), optional BASE_CONFIG and
  COMMON_OVERRIDES. A bare name is a shipped sweep file (`--sweep=ablations`)."""
  path = configs.resolve(path, configs.SWEEPS)
  spec = importlib.util.spec_from_file_location(f"cras_sweep_{Path(path).stem}", path)
  if spec is None or not os.path.isfile(path):
    raise errors.UserFileNotFoundError(f"sweep file {path} not found")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if getattr(module, "get_sweep", None) is None:
    raise errors.UserValueError(f"{path}: defines no get_sweep()")
  return module


def sweep_runs(module, base_config: dict | None = None) -> dict[str, list[str]]:
  """get_sweep() of a sweep module, given the resolved base config if it takes an argument."""
  get = module.get_sweep
  runs = get(base_config) if inspect.signature(get).parameters else get()
  where = getattr(module, "__file__", "the sweep file")
  if not isinstance(runs, Mapping):
    raise errors.UserValueError(
        f"{where}: get_sweep() returned a {type(runs).__name__}; return a dict of run name -> "
        f"list of overrides, e.g. {{'full': [], 'wo_hpi': ['model.hpi=False']}}"
    )
  out = {}
  for name, overrides in runs.items():
    if isinstance(overrides, (str, bytes)) or not isinstance(overrides, Sequence):
      example = [overrides] if isinstance(overrides, str) else ["model.hpi=False"]
      raise errors.UserValueError(
          f"{where}: run {name!r}: its overrides are a {type(overrides).__name__}; give a list "
          f"of overrides, e.g. {example!r}"
      )
    bad = [o for o in overrides if not isinstance(o, str)]
    if bad:
      raise errors.UserValueError(
          f"{where}: run {name!r}: override {bad[0]!r} is not text; write it as 'field=value'"
      )
    out[str(name)] = [normalise(o) for o in overrides]
  return out


def find_config(path: str) -> str:
  """A config path as given, relative to the current directory or the repository; a bare
  name, or configs/<name>.py outside a checkout: the shipped config (`configs.resolve`)."""
  path = configs.resolve(path)
  candidates = [Path(path), REPO_ROOT / path]
  if Path(path).parent == Path("configs") and Path(path).stem in configs.names():
    candidates.append(Path(configs.resolve(Path(path).stem)))  # installed: no configs/ shims
  for p in candidates:
    if p.is_file():
      p = p.resolve()
      try:
        return str(p.relative_to(REPO_ROOT))
      except ValueError:
        return str(p)
  raise errors.UserFileNotFoundError(f"config file {path} not found (here or in {REPO_ROOT})")


# ----------------------------------------------------------------------------- the plan


def plan(
    runs: Mapping[str, Sequence[str]],
    sweep_dir: str,
    base_config: str,
    common: Sequence[str],
    launcher: Sequence[str],
    groups: Mapping[str, str] | None = None,
) -> list[dict]:
  """One entry per run: name, workdir, command, the overrides (user's), the resolved config
  and its seed group (`with_seeds`; the run's name when it has none)."""
  sweep_dir = os.path.abspath(sweep_dir)
  config_path = find_config(base_config)
  entries = []
  for name, run_overrides in runs.items():
    if not _NAME.match(name) or name in ("data", "data_cache", "report"):
      raise errors.UserValueError(
          f"run name {name!r}: use letters, digits and _.+=- (it names a directory; "
          f"'data', 'data_cache' and 'report' are taken)"
      )
    overrides = [*common, *run_overrides]
    keys = {override_key(o) for o in overrides}
    auto = []
    if "data.cache_dir" not in keys:
      auto.append(f"--config.data.cache_dir={os.path.join(sweep_dir, 'data_cache')}")
    config, error = None, None
    try:
      config = resolve_config(str(REPO_ROOT / config_path), overrides)
    except Exception as e:  # the trainer will report it too; the run then fails
      error = f"{type(e).__name__}: {e}"
    if config is not None and config["data"]["name"] == "synthetic" and "data.root" not in keys:
      auto.append(f"--config.data.root={os.path.join(sweep_dir, 'data')}")
    if config is not None and auto:
      config = resolve_config(str(REPO_ROOT / config_path), [*auto, *overrides])
    workdir = os.path.join(sweep_dir, name)
    command = [*launcher, f"--config={config_path}", f"--workdir={workdir}", *auto, *overrides]
    entries.append(
        {
            "name": name,
            "workdir": workdir,
            "command": command,
            "base_config": config_path,
            "overrides": overrides,
            "run_overrides": list(run_overrides),
            "common_overrides": list(common),
            "auto_overrides": auto,
            "config": config,
            "config_error": error,
            "group": (groups or {}).get(name, name),
        }
    )
  return entries


def valid_result(path: str) -> bool:
  """Whether `path` is a complete metrics file: a JSON object with its step, protocol and a
  non-empty table of metric rows (not an empty, truncated or foreign file)."""
  rec = fileio.read_json_object(path, ("metrics", "step", "protocol"))
  if rec is None or not isinstance(rec["metrics"], dict) or not rec["metrics"]:
    return False
  return all(isinstance(row, dict) and row for row in rec["metrics"].values())


def is_done(entry: dict) -> tuple[bool, str]:
  """(skip?, why) for a planned run."""
  workdir = entry["workdir"]
  if not os.path.exists(os.path.join(workdir, RESULT)):
    if os.path.exists(os.path.join(workdir, RECORD)):
      return False, "not finished: resuming"
    return False, "new"
  if not valid_result(os.path.join(workdir, RESULT)):
    return False, (
        f"{RESULT} is empty, truncated or incomplete: rerunning (the trainer resumes and "
        f"evaluates again)"
    )
  rec = read_json(os.path.join(workdir, RECORD))
  if rec is None:
    return False, f"has results but no {RECORD}: rerunning (the trainer resumes)"
  if (rec.get("base_config"), rec.get("overrides")) != (entry["base_config"], entry["overrides"]):
    return False, (
        f"overrides changed (recorded {rec.get('base_config')} "
        f"{' '.join(rec.get('overrides', []))}): rerunning"
    )
  return True, "done"


def with_seeds(
    runs: Mapping[str, Sequence[str]], seeds: int, base_config: str, common: Sequence[str]
) -> tuple[dict[str, list[str]], dict[str, str]]:
  """Every run over `seeds` seeds (the base seed and the next ones) -> (runs, {run: group}).

  A multi-class run with `train.parallelism=jit` whose population does not vary `seed` already
  becomes one population
  (`train.population` gains `seed=...`, its data order as its config says); any other becomes
  separate runs `<name>_seed<k>` (`seed=k`) with the data order a population's members would
  have (`config.population.data_order` of the run's config): shared, `train.data_seed` pinned to
  the base config's (`backbone_seed`); per member, each its own seed's (nothing pinned; a
  random backbone keeps the base's seed, `train.data_seed`, with
  `train.member_data_order=per_member`)."""
  if seeds <= 1:
    return {k: list(v) for k, v in runs.items()}, {}
  path = str(REPO_ROOT / find_config(base_config))
  out: dict[str, list[str]] = {}
  groups: dict[str, str] = {}
  for name, overrides in runs.items():
    cfg = resolve_config(path, [*common, *overrides])
    base = cfg["seed"]
    values = ",".join(str(base + i) for i in range(seeds))
    current = cfg["train"]["population"] or ""
    fields = [f.partition("=")[0].strip() for f in current.split(";") if f.strip()]
    as_population = cfg["setting"] == "multi_class" and cfg["train"]["parallelism"] == "jit"
    if as_population and "seed" not in fields:  # populations train with jit only
      spec = f"{current};seed={values}" if current else f"seed={values}"
      out[name] = [*overrides, f"--config.train.population={spec}"]
      groups[name] = name
      continue
    pin = [f"--config.train.data_seed={population.backbone_seed(cfg)}"]
    if population.data_order(cfg) == "per_member":
      random = cfg["model"]["weights"] == "random"
      pin = [*pin, "--config.train.member_data_order=per_member"] if random else []
    for i in range(seeds):
      sub = f"{name}_seed{base + i}"
      out[sub] = [*overrides, f"--config.seed={base + i}", *pin]
      groups[sub] = name
  return out, groups
