"""python -m cras_jax.data.synthetic: see `cli`."""

from cras_jax.base import errors
from cras_jax.data.synthetic import cli

if __name__ == "__main__":
  cli.define_flags()
  errors.define_verbose_flag()
  errors.run(cli.main)
