"""The one call of a thin `python -m cras_jax.<command>` entry point: `command.run(module)`
runs the command whose flags (`define_flags`) and work (`main`) live in `module`."""

from __future__ import annotations

import sys

from absl import flags

from cras_jax.base import errors

# Flags adopted here are the entry point's (the module that calls `run`): its --help lists them.
flags.disclaim_key_flags()


def run(module, parser=None) -> None:
  """Defines `module`'s flags, makes them the entry point's key flags (listed by --help, after
  `module`'s docstring) and runs `module.main` under `errors.run` (a user error: one message,
  exit status 2)."""
  sys.modules["__main__"].__doc__ = module.__doc__  # what --help prints first
  module.define_flags()
  flags.adopt_module_key_flags(module)
  errors.define_verbose_flag()
  errors.run(module.main, parser=parser)
