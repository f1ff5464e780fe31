"""`python -m tools.report` runs `python -m cras_jax.report` (the repository's short form)."""

import runpy

if __name__ == "__main__":
  runpy.run_module("cras_jax.report", run_name="__main__", alter_sys=True)
