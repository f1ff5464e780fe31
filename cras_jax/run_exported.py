"""`python -m cras_jax.run_exported` (`cras-jax run_exported`): score images with an exported .npz
(JAX and NumPy only). The command's flags and work are `cras_jax.deploy.run_exported`'s."""

import sys

from cras_jax.deploy import run_exported

if __name__ == "__main__":
  run_exported.main()
  sys.exit(0)
