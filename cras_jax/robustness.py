"""`python -m cras_jax.robustness`: Robustness evaluation (docs/method.md §11, the paper's Table 7): a trained model scored on.

The command's flags and work are `cras_jax.experiments.robustness`'s; this module is its entry point
(`python -m cras_jax.robustness`, the same as `cras-jax robustness`).
"""

from absl import flags

from cras_jax.base import errors
from cras_jax.experiments import robustness

if __name__ == "__main__":
  __doc__ = robustness.__doc__  # what --help prints first
  robustness.define_flags()
  flags.adopt_module_key_flags(robustness)  # --help lists the command's flags
  errors.define_verbose_flag()
  errors.run(robustness.main)
