"""`python -m cras_jax.sweep`: Runs a list of named runs (each a list of config overrides) into sub-workdirs, resumably.

The command's flags and work are `cras_jax.experiments.sweep`'s; this module is its entry point
(`python -m cras_jax.sweep`, the same as `cras-jax sweep`).
"""

from absl import flags

from cras_jax.base import errors
from cras_jax.experiments import sweep

if __name__ == "__main__":
  __doc__ = sweep.__doc__  # what --help prints first
  sweep.define_flags()
  flags.adopt_module_key_flags(sweep)  # --help lists the command's flags
  errors.define_verbose_flag()
  errors.run(sweep.main, parser=sweep.parse_flags)
