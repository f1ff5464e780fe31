"""The shipped configs (get_config() -> ml_collections.ConfigDict), reachable by name.

`--config=mvtec` names cras_jax/configs/mvtec.py wherever the command runs (a bare name: no
folder, no `.py`); any other value is a file path as before (`--config=configs/mvtec.py`, or
your own file), with `:arg` passed to get_config and `--config.x.y=` overrides as usual. Sweep
files likewise: `--sweep=ablations` names cras_jax/configs/sweeps/ablations.py.

A file's config gets every field it lacks (`schema.filled`, before the overrides apply): a
config file written before a field existed runs as it did, and `--config.<that field>=` sets it.
"""

from __future__ import annotations

import os

import ml_collections
from absl import flags
from ml_collections.config_flags import config_flags  # the module: its parser and flag classes

from cras_jax.base import schema

FOLDER = os.path.dirname(os.path.abspath(__file__))
SWEEPS = os.path.join(FOLDER, "sweeps")


def names(folder: str = FOLDER) -> list[str]:
  """The shipped configs (or sweeps, with folder=SWEEPS) by name."""
  return sorted(f[:-3] for f in os.listdir(folder) if f.endswith(".py") and not f.startswith("_"))


def resolve(value: str, folder: str = FOLDER) -> str:
  """A shipped file's path for a bare name ('mvtec', 'mvtec:arg'); any other value as given."""
  name, sep, arg = value.partition(":")
  if name and os.sep not in name and "/" not in name and not name.endswith(".py"):
    path = os.path.join(folder, f"{name}.py")
    if name in names(folder):
      return path + sep + arg
  return value


class _NamedConfigParser(config_flags.ConfigFileFlagParser):
  """ml_collections' config-file parser, with shipped configs by name and every field a file's
  config lacks filled (`schema.filled`)."""

  def parse(self, path):
    config = super().parse(resolve(path))
    if isinstance(config, ml_collections.ConfigDict) and not isinstance(
        config, ml_collections.FrozenConfigDict
    ):
      config = schema.filled(config)
    return config


def define_config_flag(
    name: str = "config",
    default: str | None = None,
    help_string: str = "",
    flag_values: flags.FlagValues = flags.FLAGS,
    lock_config: bool = True,
    sys_argv: list[str] | None = None,
) -> flags.FlagHolder:
  """`config_flags.DEFINE_config_file` whose value may also name a shipped config (module
  docstring)."""
  help_string = help_string or (
      f"A config file with get_config(), or a shipped config by name ({', '.join(names())})."
  )
  # DEFINE_config_file with the parser above (ml_collections builds its flag the same way).
  flag = config_flags._ConfigFlag(  # noqa: SLF001 - the one way to give it another parser
      parser=_NamedConfigParser(name=name, lock_config=lock_config),
      serializer=flags.ArgumentSerializer(),
      name=name,
      default=default,
      help_string=help_string,
      flag_values=flag_values,
      sys_argv=sys_argv,
  )
  return flags.DEFINE_flag(flag, flag_values)
