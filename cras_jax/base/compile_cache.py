"""XLA's persistent compilation cache, set up once by every command (`setup`).

With it, a later start of any command (a resumed training, `--mode=eval`, predict, export,
...) loads its compiled steps from disk instead of compiling them again; entries are keyed by
JAX's own cache keys (program, compiler options, devices, versions), so a change in any of
them compiles anew. Where: `config.cache.compilation` ("auto" | "off" | a directory), else
`$CRAS_JAX_COMPILATION_CACHE` (same values), else JAX's own `$JAX_COMPILATION_CACHE_DIR`,
else <user cache>/xla (`user_cache.root`).
"""

from __future__ import annotations

import os

import jax

from cras_jax.base import errors, schema, user_cache

ENV = "CRAS_JAX_COMPILATION_CACHE"
OFF = ("off", "none", "false", "0", "no")
# Programs that compile faster than this are not written. JAX's default (1 s) skips most of
# this project's programs; 0 keeps every one: the tiny ones of loading weights and
# initialising a state add up to seconds at each start.
MIN_COMPILE_SECS = 0.0

_configured: str | None = None


def resolve(config=None, environ=None) -> str | None:
  """The compilation cache directory for `config` and the environment, or None (off)."""
  environ = os.environ if environ is None else environ
  value = str(user_cache.field(config, "cache.compilation") or schema.default("cache.compilation"))
  if value.strip().lower() == "auto":
    value = environ.get(ENV, "") or "auto"
  if value.strip().lower() in OFF:
    return None
  if value.strip().lower() == "auto":
    jax_own = environ.get("JAX_COMPILATION_CACHE_DIR", "")
    if jax_own:
      return jax_own
    return os.path.join(user_cache.root(config, environ), "xla")
  return os.path.abspath(os.path.expanduser(value))


def setup(config=None) -> str | None:
  """Turns the persistent compilation cache on (or off) as `resolve` says -> its directory.

  Call it once at the start of a command, before anything is compiled (JAX reads the setting
  when it first compiles); later calls with the same answer do nothing."""
  global _configured
  path = resolve(config)
  if path == _configured and path is not None:
    return path
  if path is None:
    jax.config.update("jax_enable_compilation_cache", False)
  else:
    try:
      if os.path.isfile(path):
        raise NotADirectoryError(0, "it is a file")
      os.makedirs(path, exist_ok=True)
    except OSError as e:  # a file, a symlink loop, no permission: the user's setting
      raise errors.UserValueError(
          f"the compilation cache folder {path!r} cannot be made ({e.strerror or e}); it comes "
          f"from cache.compilation, else ${ENV}, $JAX_COMPILATION_CACHE_DIR or "
          f"<cache.dir>/xla: point that at a folder, or set --config.cache.compilation=off"
      ) from None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update(
        "jax_persistent_cache_min_compile_time_secs",
        min(MIN_COMPILE_SECS, jax.config.jax_persistent_cache_min_compile_time_secs),
    )
  _configured = path
  return path
