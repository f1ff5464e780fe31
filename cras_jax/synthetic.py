"""`python -m cras_jax.synthetic`: writes the demo's synthetic dataset (the generator's command
line, `cras_jax.data.synthetic.cli`; its docstring is what --help prints)."""

from cras_jax.base import command
from cras_jax.data.synthetic import cli

if __name__ == "__main__":
  command.run(cli)
