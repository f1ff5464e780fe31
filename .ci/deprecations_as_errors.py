"""Deprecation warnings of JAX, Flax, Optax and Orbax as errors (used by .ci/py312).

Two kinds are caught. A library that calls a deprecated part of itself (or another library's
deprecated part) issues the warning from its own modules (`jax._src...`); a deprecated name or
argument used by cras_jax is attributed, through the warning's stacklevel, to the caller
(`cras_jax...`, `tests...`, or `__main__` in a command's process). Warning filters match the
issuing module from its start (a regular expression), so both kinds are listed.

Loaded twice: as a pytest plugin (`-p deprecations_as_errors`: the filters become ini-style
`filterwarnings` lines, which pytest reads as regular expressions, unlike its `-W` option, which
escapes them), and at start-up of every process of the venv (`install()`, from the venv's
`sitecustomize`), so the commands the tests start as subprocesses are held to the same.
PYTEST_DONT_REWRITE (imported before pytest starts: nothing here to rewrite).
"""

import re
import warnings

# Modules whose own warnings count, and the callers whose deprecated calls count.
LIBRARIES = ("jax", "jaxlib", "flax", "optax", "orbax")
CALLERS = ("cras_jax", "tests", "__main__")
CATEGORIES = (DeprecationWarning, FutureWarning)

MODULES = r"(%s)(\.|$)" % "|".join(map(re.escape, LIBRARIES + CALLERS))


def filter_lines() -> list[str]:
  """The filters in pytest's ini form (`action:message:category:module`)."""
  return [f"error::{c.__name__}:{MODULES}" for c in CATEGORIES]


def install() -> None:
  """Adds the filters to this process's warning filters."""
  for category in CATEGORIES:
    warnings.filterwarnings("error", category=category, module=MODULES)


def pytest_configure(config) -> None:
  for line in filter_lines():
    config.addinivalue_line("filterwarnings", line)
