"""`python -m cras_jax.run_exported`: Scores images with a model exported by `python -m cras_jax.export`, using only jax and numpy.

The command's work is `cras_jax.deploy.run_exported`'s (NumPy and the runtime only, no JAX); this module is its
entry point (`python -m cras_jax.run_exported`, the same as `cras-jax run_exported`).
"""

import sys

from cras_jax.deploy import run_exported

if __name__ == "__main__":
  run_exported.main()
  sys.exit(0)
