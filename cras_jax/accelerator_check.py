"""`python -m cras_jax.accelerator_check` (`cras-jax accelerator_check`): the prepared check of a
GPU or TPU machine. The command's flags and work are `cras_jax.perf.accelerator_check`'s."""

from cras_jax.base import command
from cras_jax.perf import accelerator_check

if __name__ == "__main__":
  command.run(accelerator_check)
