import numpy as np

from cras_jax.runs import workdir as runs


def test_load_run_restores_trained_state_and_config(tiny_run):
  run = runs.load_run(str(tiny_run["workdir"]))
  assert run.config.data.crop == 64 and run.config.model.embed_dim == 32
  assert run.class_names == ["chip", "fabric", "gear", "granite"]
  assert int(run.state.step) == 9
  assert np.abs(np.asarray(run.state.centres)).sum() > 0
