"""`python -m tools.benchmark` runs `python -m cras_jax.benchmark` (the repository's short form)."""

import runpy

if __name__ == "__main__":
  runpy.run_module("cras_jax.benchmark", run_name="__main__", alter_sys=True)
