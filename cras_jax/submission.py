"""`python -m cras_jax.submission`: MVTec AD 2's test_private and test_private_mixed scored by a
trained run and written in the evaluation server's format.

The command's flags and work are `cras_jax.scoring.submission`'s; this module is its entry point
(`python -m cras_jax.submission`, the same as `cras-jax submission`).
"""

from cras_jax.base import command
from cras_jax.scoring import submission

if __name__ == "__main__":
  command.run(submission)
