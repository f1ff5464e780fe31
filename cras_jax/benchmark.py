"""`python -m cras_jax.benchmark` (`cras-jax benchmark`): images/s of the steps on this machine's
devices. The command's flags and work are `cras_jax.perf.benchmark`'s."""

from cras_jax.base import command
from cras_jax.perf import benchmark

if __name__ == "__main__":
  command.run(benchmark)
