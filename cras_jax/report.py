"""`python -m cras_jax.report` (`cras-jax report`): tables and curves over runs, sweeps and seeds.
The command's flags and work are `cras_jax.experiments.report`'s."""

from cras_jax.base import command
from cras_jax.experiments import report

if __name__ == "__main__":
  command.run(report)
