"""`python -m tools.scaling` runs `python -m cras_jax.scaling` (the repository's short form)."""

import runpy

if __name__ == "__main__":
  runpy.run_module("cras_jax.scaling", run_name="__main__", alter_sys=True)
