"""`python -m cras_jax.robustness` (`cras-jax robustness`): score a trained run on perturbed test
images. The command's flags and work are `cras_jax.experiments.robustness`'s."""

from cras_jax.base import command
from cras_jax.experiments import robustness

if __name__ == "__main__":
  command.run(robustness)
