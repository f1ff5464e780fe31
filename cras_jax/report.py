"""`python -m cras_jax.report`: Gathers the results of several workdirs (a sweep, or runs given one by one) into tables and.

The command's flags and work are `cras_jax.experiments.report`'s; this module is its entry point
(`python -m cras_jax.report`, the same as `cras-jax report`).
"""

from absl import flags

from cras_jax.base import errors
from cras_jax.experiments import report

if __name__ == "__main__":
  __doc__ = report.__doc__  # what --help prints first
  report.define_flags()
  flags.adopt_module_key_flags(report)  # --help lists the command's flags
  errors.define_verbose_flag()
  errors.run(report.main)
