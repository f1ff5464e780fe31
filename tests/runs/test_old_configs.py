"""A config stored by an older release (without the fields added since) is filled once, where it
is read, with what that release did without them; the rest of the code reads every field as
present, and no code but the schema spells a field's default."""

import json
import os
import pathlib
import re
import shutil

import pytest

from cras_jax.backbones import layers
from cras_jax.base import compile_cache, schema, user_cache
from cras_jax.config import population
from cras_jax.configs import demo, mvtec
from cras_jax.data import preprocess
from cras_jax.engine import steps
from cras_jax.runs import specs, trained
from cras_jax.runs import workdir as runs

ROOT = pathlib.Path(__file__).resolve().parents[2]
LATER = [f.name for f in schema.FIELDS if f.later]


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  return out


def _stored(config) -> dict:
  """`config` as a run stores it (run_meta's JSON)."""
  return json.loads(config.to_json_best_effort())


def _older(stored: dict) -> dict:
  """`stored` as a release before every `later` field would have stored it: those fields
  removed, and a section left empty (`cache`) with them; `log` too (older than its fields)."""
  old = json.loads(json.dumps(stored))
  for name in LATER:
    *parents, leaf = name.split(".")
    node = old
    for p in parents:
      node = node[p]
    del node[leaf]
  for section in [k for k, v in old.items() if v == {}] + ["log"]:
    del old[section]
  return old


def _as_before(stored: dict) -> dict:
  """What the code read from `_older(stored)` before its fields were filled at load: the later
  fields' `LATER_DEFAULTS` (`config_check.get`, `population._get`, `.get(field, default)`), the
  log switches on (`progress.configure`, `specs.tensorboard`)."""
  want = _flat(stored)
  want.update(_flat(schema.LATER_DEFAULTS))  # a tuple as the JSON stores it: a list
  want.update({"log.progress": True, "log.tensorboard": True})
  return want


@pytest.mark.parametrize("module", [mvtec, demo])
def test_an_older_stored_config_loads_filled_with_the_values_read_before(module):
  stored = _stored(module.get_config())
  old = _older(stored)
  assert "cache" not in old and "kernels" not in old["model"]  # the older form
  loaded = runs.config_from_meta({"config": old})
  assert _flat(loaded.to_dict()) == _as_before(stored)
  assert old == _older(stored)  # the stored dict itself is left as it was
  # What the readers of those fields make of it: as before.
  assert population.data_order(loaded) == "shared"  # the order of runs saved before the field
  assert population.backbone_seed(loaded) == loaded.seed
  data = specs.data_spec(loaded)
  assert data.mask_rule == "binarise" and data.limits == preprocess.Limits()
  assert specs.tensorboard(loaded) is True
  env = {"HOME": "/h"}
  assert user_cache.root(loaded, env) == user_cache.root(None, env)
  assert compile_cache.resolve(loaded, env) == compile_cache.resolve(None, env)
  spec = steps.ModelSpec(loaded, 2, grid=(8, 8))  # the grid a run's meta records: no trace
  assert spec.kernels == layers.resolve_kernels("auto")
  # Resuming it with today's config of the same values is not refused for the new fields.
  assert runs.config_differences(old, stored) == []
  assert runs.config_differences(old, _stored(loaded)) == []


def test_a_filled_field_that_differs_from_the_older_meaning_is_a_difference():
  stored = _stored(mvtec.get_config())
  now = json.loads(json.dumps(stored))
  now["model"]["aggregate_dtype"] = "compute"
  assert runs.config_differences(_older(stored), now) == [
      "model.aggregate_dtype: saved 'float32', now 'compute'"
  ]


def test_filled_keeps_a_configdicts_lock_and_its_values():
  config = mvtec.get_config()
  config.model.embed_dim = 64
  del config.train["population"]
  config.lock()
  same = schema.filled(config)
  assert same is config and config.is_locked
  assert config.train.population == "" and config.model.embed_dim == 64
  with pytest.raises(AttributeError):
    config.model.no_such_field = 1


def test_a_config_file_without_the_later_fields_runs_as_before(tmp_path):
  """A config file written before the later fields: filled at the flag, so its overrides of
  them work and the code reads them as present."""
  from absl import flags

  from cras_jax import configs

  path = tmp_path / "old_config.py"
  path.write_text(
      "import ml_collections\n"
      "def get_config():\n"
      f"  return ml_collections.ConfigDict({_older(_stored(demo.get_config()))!r})\n"
  )
  argv = ["x", f"--config={path}", "--config.model.kernels=xla"]
  fv = flags.FlagValues()
  configs.define_config_flag("config", None, flag_values=fv, sys_argv=argv)
  fv(argv)
  assert fv.config.model.kernels == "xla" and fv.config.train.member_data_order == "shared"
  assert fv.config.cache.compilation == "auto" and fv.config.log.progress is True


def test_an_older_run_restores_with_its_config_filled(tiny_run, tmp_path):
  """The tiny run's checkpoints with their stored config rewritten as an older release stored
  it: read back filled, the state restored, scored by the same spec."""
  work = tmp_path / "run"
  shutil.copytree(tiny_run["workdir"] / "checkpoints", work / "checkpoints")
  stored = None
  for step in os.listdir(work / "checkpoints"):
    file = work / "checkpoints" / step / "meta" / "metadata"
    if step.isdigit():
      meta = json.loads(file.read_text())
      stored = meta["config"]
      meta["config"] = _older(stored)
      file.write_text(json.dumps(meta))
  assert stored is not None
  run = trained.load_run(str(work))
  assert _flat(run.config.to_dict()) == _as_before(stored)
  assert run.spec.kernels == layers.resolve_kernels("auto")
  assert int(run.state.step) == 9


# ----------------------------------------------------------------------------- no second default

SECTIONS = sorted({f.name.split(".")[0] for f in schema.FIELDS if "." in f.name} | {"synthetic"})
NAMES = {f.name.split(".")[-1] for f in schema.FIELDS} | set(SECTIONS)
_S = "|".join(SECTIONS)
_KEY = r"""\(\s*["'](\w+)["']\s*[,)]"""
# A config field read with a fallback: `<x>.<section>.get("f"...)`, `config.get("f"...)`,
# `cfg["<section>"].get("f"...)`, `meta["config"].get(...)`, `getattr(config..., "f", ...)`.
FALLBACKS = [
    re.compile(rf"\.(?:{_S})\.get{_KEY}"),
    re.compile(rf"\b(?:config|cfg|model_cfg)\.get{_KEY}"),
    re.compile(rf"""\[["'](?:{_S})["']\]\.get{_KEY}"""),
    re.compile(rf"""\[["']config["']\]\.get{_KEY}"""),
    re.compile(r"""getattr\(\s*(?:config|cfg)\b[\w.]*\s*,\s*["'](\w+)["']\s*,"""),
]
# A section held in a short name (`m = config.model`): `m.get("kernels", ...)`, its fields only.
ALIASES = {
    section: (
        re.compile(rf"\b(?:{alias}|{section})\.get{_KEY}"),
        {f.name.split(".")[-1] for f in schema.FIELDS if f.name.startswith(f"{section}.")},
    )
    for section, alias in (("model", "m"), ("data", "d"), ("train", "t"))
}


def test_no_code_but_the_schema_spells_a_config_fields_default():
  found = []
  for path in sorted((ROOT / "cras_jax").rglob("*.py")):
    rel = path.relative_to(ROOT).as_posix()
    if rel == "cras_jax/base/schema.py":
      continue
    for n, line in enumerate(path.read_text().splitlines(), 1):
      if "LATER_DEFAULTS" in line:  # read by `schema.filled` alone
        found.append(f"{rel}:{n}: {line.strip()}")
      for pattern, names in [(p, NAMES) for p in FALLBACKS] + list(ALIASES.values()):
        if any(m.group(1) in names for m in pattern.finditer(line)):
          found.append(f"{rel}:{n}: {line.strip()}")
  assert (
      not found
  ), "config fields read with a fallback (`schema.filled` fills them):\n" + "\n".join(found)
