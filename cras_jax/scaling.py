"""`python -m cras_jax.scaling`: Scaling model of the CRAS steps from their compiled programs (docs/performance.md).

The command's flags and work are `cras_jax.perf.scaling`'s; this module is its entry point
(`python -m cras_jax.scaling`, the same as `cras-jax scaling`).
"""

from absl import flags

from cras_jax.base import errors
from cras_jax.perf import scaling

if __name__ == "__main__":
  __doc__ = scaling.__doc__  # what --help prints first
  scaling.define_flags()
  flags.adopt_module_key_flags(scaling)  # --help lists the command's flags
  errors.define_verbose_flag()
  errors.run(scaling.main)
