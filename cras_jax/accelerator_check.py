"""`python -m cras_jax.accelerator_check`: One call that checks and measures what matters on an accelerator (docs/performance.md).

The command's flags and work are `cras_jax.perf.accelerator_check`'s; this module is its entry point
(`python -m cras_jax.accelerator_check`, the same as `cras-jax accelerator_check`).
"""

from absl import flags

from cras_jax.base import errors
from cras_jax.perf import accelerator_check

if __name__ == "__main__":
  __doc__ = accelerator_check.__doc__  # what --help prints first
  accelerator_check.define_flags()
  flags.adopt_module_key_flags(accelerator_check)  # --help lists the command's flags
  errors.define_verbose_flag()
  errors.run(accelerator_check.main)
