"""`python -m cras_jax.figures` (`cras-jax figures`): the paper's figures from a trained run (t-SNE,
heatmaps, histograms). The command's flags and work are `cras_jax.experiments.figures`'s."""

from cras_jax.base import command
from cras_jax.experiments import figures

if __name__ == "__main__":
  command.run(figures)
