"""`python -m cras_jax.sweep` (`cras-jax sweep`): run a sweep of configs (ablations, seeds,
parameters) into one folder. The command's flags and work are `cras_jax.experiments.sweep`'s."""

from cras_jax.base import command
from cras_jax.experiments import sweep

if __name__ == "__main__":
  command.run(sweep, parser=sweep.parse_flags)
