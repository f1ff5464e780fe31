"""`python -m tools.sweep` runs `python -m cras_jax.sweep` (the repository's short form)."""

import runpy

if __name__ == "__main__":
  runpy.run_module("cras_jax.sweep", run_name="__main__", alter_sys=True)
