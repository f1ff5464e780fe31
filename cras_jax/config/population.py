"""`train.population`: which members a population run trains, and each member's config.

The field is a string of `;`-separated `field=v1,v2,...` (e.g. `"seed=0,1,2,3"` or
`"seed=0,1;model.noise_sigma=0.1,0.2"`); the members are every combination, the first field
varying slowest. Only `FIELDS` may vary: they change the heads' initialisation and noise
(`seed`), the noise and DAFS (`model.noise_sigma`, `model.dafs_beta`) or the optimiser
(`train.lr_*`, `train.wd_*`), never the data, the backbone or the shapes, so the members share
one backbone. Member k equals the single run of `member_configs(config)[k]`.

The data order (`train.member_data_order`, `data_order`): "shared", every member draws the
base config's order (`train.data_seed`, -1: the base `seed`), so a spread over the members spans
the initialisation and the noise only; "per_member", member k draws its own seed's order (the
single run `seed=k`), so the spread spans the data order too (`variance_sources` says which).
"auto" is per_member on stored features (`train.cache_features`: each member gathers its own
batch from the cache, a cheap host gather) and shared when the backbone runs in the step (there
per-member batches run the backbone once per member: S times the step's dominant cost). A
`train.data_seed` >= 0 pins one shared order under "auto". A random backbone
(`model.weights='random'`) follows `train.data_seed` (-1: `seed`, `backbone_seed`) and stays
shared by the members under either order.
"""

from __future__ import annotations

import ast
import itertools

import ml_collections

from cras_jax.base import schema

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


ORDERS = ("auto", "shared", "per_member")  # `train.member_data_order` (base/schema.py)
INIT_NOISE = "initialisation + noise"  # what distinct `seed`s vary
DATA_ORDER = "data order"


# A field of a config (ConfigDict or plain dict; configs read from a run or a file are complete:
# `schema.filled`).
_get = schema.lookup


def _int(value, fallback: int) -> int:
  return value if isinstance(value, int) and not isinstance(value, bool) else fallback


def backbone_seed(config) -> int:
  """The seed of a random backbone, and of a shared data order (`train.data_seed`, else
  `seed`)."""
  s = _int(_get(config, "train.data_seed"), -1)
  return _int(_get(config, "seed"), 0) if s < 0 else s


def data_order(config) -> str:
  """`train.member_data_order` resolved: "shared" or "per_member" ("auto": per_member with
  `train.cache_features` unless `train.data_seed` >= 0 pins an order; an unknown value is
  shared, and the config check names it)."""
  order = _get(config, "train.member_data_order")
  if order == "auto":
    pinned = _int(_get(config, "train.data_seed"), -1) >= 0
    return "per_member" if _get(config, "train.cache_features") and not pinned else "shared"
  return "per_member" if order == "per_member" else "shared"


def order_seed(config) -> int:
  """The seed of a (single-run) config's data order: `seed` with a per-member order, else
  `backbone_seed` (`train.data_seed`, else `seed`). A member's is its member config's."""
  if data_order(config) == "per_member":
    return _int(_get(config, "seed"), 0)
  return backbone_seed(config)


def effective_data_order(config) -> str:
  """`data_order` where it changes a run's batches: a population's, or a single run's whose
  order seed differs from its data seed; else "shared" (a single run's order is one seed's
  either way). What a resumed run must not change (`runs.workdir.config_differences`)."""
  order = data_order(config)
  if not _get(config, "train.population") and order_seed(config) == backbone_seed(config):
    return "shared"
  return order


def variance_sources(configs) -> str:
  """What differs between runs of `configs` (a population's members, a setting's seeds):
  "initialisation + noise" (their seeds), "data order" (their orders' seeds), a random backbone,
  and any other population field by name; joined by " + " ("none" if nothing)."""
  configs = list(configs)

  def differ(fn) -> bool:
    return len({repr(fn(c)) for c in configs}) > 1

  parts = []
  if differ(lambda c: _get(c, "seed")):
    parts.append(INIT_NOISE)
  if differ(order_seed):
    parts.append(DATA_ORDER)
  random = [c for c in configs if _get(c, "model.weights") == "random"]
  if random and (len(random) < len(configs) or differ(backbone_seed)):
    parts.append("random backbone")
  parts += [f for f in FIELDS[1:] if differ(lambda c, f=f: _get(c, f))]
  return " + ".join(parts) or "none"


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
  population, and its data order (`data_order`): shared, the base config's order
  (`train.data_seed` = `backbone_seed`); per member, its own seed's (`train.data_seed` = -1,
  the single run `seed=k`; with a random backbone `train.data_seed` keeps the base config's
  backbone seed, and `train.member_data_order='per_member'` keeps the order its seed's)."""
  cfg = ml_collections.ConfigDict(config.to_dict())
  order, shared = data_order(config), backbone_seed(config)
  for field, v in values.items():
    node = cfg
    *path, key = field.split(".")
    for p in path:
      node = node[p]
    node[key] = v
  cfg.train.population = ""
  cfg.train.member_data_order = order
  random = _get(config, "model.weights") == "random"
  cfg.train.data_seed = shared if order == "shared" or random else -1
  return cfg


def member_configs(config) -> list[tuple[str, ml_collections.ConfigDict]]:
  """(name, single-run config) of every member of `config`'s population."""
  return [(member_name(v), member_config(config, v)) for v in members(config.train.population)]


def problems(config, problems_of) -> list[str]:
  """The config check of a population: its spec, and every member's config (`problems_of`
  of `config_check`, without files), each problem named by its member."""
  text = config.train.population
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
