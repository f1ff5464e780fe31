"""`train.population`: which members a population run trains, and each member's config.

The field is a string of `;`-separated `field=v1,v2,...` (e.g. `"seed=0,1,2,3"` or
`"seed=0,1;model.noise_sigma=0.1,0.2"`); the members are every combination, the first field
varying slowest. Only `FIELDS` may vary: they change the heads' initialisation and noise
(`seed`), the noise and DAFS (`model.noise_sigma`, `model.dafs_beta`) or the optimiser
(`train.lr_*`, `train.wd_*`), never the data, the backbone or the shapes, so one batch of
backbone features serves every member. The data order (and a random backbone) follow
`train.data_seed` (-1: the base config's `seed`), shared by the members: member k equals a
single run of `member_configs(config)[k]`.
"""

from __future__ import annotations

import ast
import itertools

import ml_collections

FIELDS = (
    "seed",
    "model.noise_sigma",
    "model.dafs_beta",
    "train.lr_adapter",
    "train.lr_disc",
    "train.wd_adapter",
    "train.wd_disc",
)
SUMMARY = "population"  # results/population_<tag>.{json,md,csv}


def data_seed(config) -> int:
  """The seed of the data order and of a random backbone (`train.data_seed`, else `seed`)."""
  s = config.train.get("data_seed", -1)
  return config.seed if s is None or s < 0 else s


def _value(text: str):
  try:
    return ast.literal_eval(text.strip())
  except (ValueError, SyntaxError):
    return text.strip()


def parse(text: str) -> list[tuple[str, list]]:
  """'seed=0,1;model.noise_sigma=0.1,0.2' -> [('seed', [0, 1]), ('model.noise_sigma', [...])].

  Raises ValueError naming the part that is wrong (an unknown or repeated field, no values)."""
  out: list[tuple[str, list]] = []
  for part in (p.strip() for p in str(text).split(";")):
    if not part:
      continue
    field, sep, values = part.partition("=")
    field = field.strip()
    if not sep or not values.strip():
      raise ValueError(f"{part!r}: write field=v1,v2,... (e.g. seed=0,1,2,3)")
    if field not in FIELDS:
      raise ValueError(
          f"{field!r} cannot vary within a population (it changes more than the heads); "
          f"allowed: {', '.join(FIELDS)}. Run other values as separate runs (cras_jax.sweep)"
      )
    if field in dict(out):
      raise ValueError(f"{field!r} is given twice")
    vals = [_value(v) for v in values.split(",")]
    for i, v in enumerate(vals):
      same = [w for w in vals[:i] if w == v or repr(w) == repr(v)]  # 1 and 1.0 are one value
      if same:
        raise ValueError(
            f"{field}: {same[0]!r} and {v!r} are the same value ({values}): two members would "
            f"train the same model; give each value once"
        )
    out.append((field, vals))
  if not out:
    raise ValueError("no field: write field=v1,v2,... (e.g. seed=0,1,2,3)")
  return out


def members(text: str) -> list[dict]:
  """Every combination of the values, as {field: value} (first field slowest)."""
  fields = parse(text)
  names = [f for f, _ in fields]
  return [dict(zip(names, combo)) for combo in itertools.product(*(v for _, v in fields))]


def value_text(v) -> str:
  """A value as a member's name shows it, losslessly: a float in its shortest form that reads
  back as the same float ('0.2', '1e-05', '0.30000000000000004'), never rounded to a few
  digits, so two values of a population never share a name."""
  if isinstance(v, float):
    short = f"{v:g}"
    return short if float(short) == v else repr(v)
  return str(v)


def member_name(values: dict) -> str:
  """A member's directory name: 'seed1', 'seed1_noise_sigma0.2'."""
  return "_".join(f"{field.split('.')[-1]}{value_text(v)}" for field, v in values.items())


def member_config(config, values: dict) -> ml_collections.ConfigDict:
  """The single-run config member `values` equals: the base config with those values, no
  population, and the population's data seed."""
  cfg = ml_collections.ConfigDict(config.to_dict())
  shared = data_seed(config)
  for field, v in values.items():
    node = cfg
    *path, key = field.split(".")
    for p in path:
      node = node[p]
    node[key] = v
  cfg.train.population = ""
  cfg.train.data_seed = shared
  return cfg


def member_configs(config) -> list[tuple[str, ml_collections.ConfigDict]]:
  """(name, single-run config) of every member of `config`'s population."""
  return [(member_name(v), member_config(config, v)) for v in members(config.train.population)]


def problems(config, problems_of) -> list[str]:
  """The config check of a population: its spec, and every member's config (`problems_of`
  of `config_check`, without files), each problem named by its member."""
  text = config.train.get("population", "")
  if not text:
    return []
  try:
    values = members(text)
  except ValueError as e:
    return [f"train.population={text!r}: {e}"]
  out = []
  if config.setting != "multi_class":
    out.append(f"train.population={text!r}: a population trains one multi-class model per member")
  if len(values) < 1:
    out.append(f"train.population={text!r}: no members")
  for v in values:
    try:
      cfg = member_config(config, v)
    except (TypeError, KeyError, AttributeError) as e:
      out.append(f"train.population={text!r}: member {v}: {e}")
      continue
    for p in problems_of(cfg, False):
      if p not in out and any(p.startswith(f) for f in v):
        out.append(f"train.population member {member_name(v)}: {p}")
  return out
