"""`python -m cras_jax.benchmark`: Throughput benchmark of the CRAS steps: training and scoring, images/s.

The command's flags and work are `cras_jax.perf.benchmark`'s; this module is its entry point
(`python -m cras_jax.benchmark`, the same as `cras-jax benchmark`).
"""

from absl import flags

from cras_jax.base import errors
from cras_jax.perf import benchmark

if __name__ == "__main__":
  __doc__ = benchmark.__doc__  # what --help prints first
  benchmark.define_flags()
  flags.adopt_module_key_flags(benchmark)  # --help lists the command's flags
  errors.define_verbose_flag()
  errors.run(benchmark.main)
