"""`python -m cras_jax.figures`: Figures of a trained run: the paper's Fig. 6 (qualitative grid) and Fig. 7 (t-SNE of.

The command's flags and work are `cras_jax.experiments.figures`'s; this module is its entry point
(`python -m cras_jax.figures`, the same as `cras-jax figures`).
"""

from absl import flags

from cras_jax.base import errors
from cras_jax.experiments import figures

if __name__ == "__main__":
  __doc__ = figures.__doc__  # what --help prints first
  figures.define_flags()
  flags.adopt_module_key_flags(figures)  # --help lists the command's flags
  errors.define_verbose_flag()
  errors.run(figures.main)
