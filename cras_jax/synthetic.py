"""`python -m cras_jax.synthetic`: writes the demo's synthetic dataset (the generator's command
line, `cras_jax.data.synthetic.cli`; its docstring is what --help prints)."""

from absl import flags

from cras_jax.base import errors
from cras_jax.data.synthetic import cli

if __name__ == "__main__":
  __doc__ = cli.__doc__  # what --help prints first
  cli.define_flags()
  flags.adopt_module_key_flags(cli)  # --help lists the generator's flags
  errors.define_verbose_flag()
  errors.run(cli.main)
