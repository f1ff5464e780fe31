"""The user cache: one folder for what is fetched or compiled once per machine (torchvision
weights, named datasets, XLA's compiled programs), shared by every run.

Its place: `config.cache.dir`, else `$CRAS_JAX_CACHE_DIR`, else `$XDG_CACHE_HOME/cras_jax`,
else `~/.cache/cras_jax`.
"""

from __future__ import annotations

import os

ENV = "CRAS_JAX_CACHE_DIR"


def _field(config, group: str, name: str, default=""):
  """`config.<group>.<name>`, or `default` for configs saved before the field existed."""
  if config is None:
    return default
  node = config.get(group) if hasattr(config, "get") else None
  if node is None or name not in node:
    return default
  return node[name]


def root(config=None, environ=None) -> str:
  """The user cache folder (not created); `environ`: the environment (default the process's)."""
  environ = os.environ if environ is None else environ
  given = _field(config, "cache", "dir") or environ.get(ENV, "")
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
  given = _field(config, "data", "data_dir")
  return (
      os.path.abspath(os.path.expanduser(given))
      if given
      else os.path.join(root(config), "datasets")
  )
