"""python -m cras_jax.data.synthetic: see `cli`."""

from absl import app

from cras_jax.data.synthetic import cli

if __name__ == "__main__":
  cli.define_flags()
  app.run(cli.main)
