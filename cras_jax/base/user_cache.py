"""The user cache: one folder for what is fetched or compiled once per machine (torchvision
weights, named datasets, XLA's compiled programs), shared by every run.

Its place: `config.cache.dir`, else `$CRAS_JAX_CACHE_DIR`, else `$XDG_CACHE_HOME/cras_jax`,
else `~/.cache/cras_jax`.
"""

from __future__ import annotations

import os

from cras_jax.base import schema

ENV = "CRAS_JAX_CACHE_DIR"


def field(config, dotted: str):
  """`config`'s field `dotted`; None without a config (the environment decides) or where the
  config holds only some sections (a config read from a run or a file is complete:
  `schema.filled`)."""
  return None if config is None else schema.lookup(config, dotted)


def root(config=None, environ=None) -> str:
  """The user cache folder (not created); `environ`: the environment (default the process's)."""
  environ = os.environ if environ is None else environ
  given = field(config, "cache.dir") or environ.get(ENV, "")
  if not given:
    home = environ.get("HOME") or os.path.expanduser("~")
    xdg = environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache")
    given = os.path.join(xdg, "cras_jax")
  return os.path.abspath(os.path.expanduser(given))


def weights_dir(config=None) -> str:
  return os.path.join(root(config), "weights")


def datasets_dir(config=None) -> str:
  """Where named datasets are fetched and prepared: `config.data.data_dir` or
  <user cache>/datasets."""
  given = field(config, "data.data_dir")
  return (
      os.path.abspath(os.path.expanduser(given))
      if given
      else os.path.join(root(config), "datasets")
  )
