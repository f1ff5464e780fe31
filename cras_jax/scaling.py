"""`python -m cras_jax.scaling` (`cras-jax scaling`): compiled programs and projections for GPUs and
TPUs (no device needed). The command's flags and work are `cras_jax.perf.scaling`'s."""

from cras_jax.base import command
from cras_jax.perf import scaling

if __name__ == "__main__":
  command.run(scaling)
