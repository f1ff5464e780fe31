"""`python -m tools.run_exported` runs `python -m cras_jax.run_exported` (the repository's short form)."""

import runpy

if __name__ == "__main__":
  runpy.run_module("cras_jax.run_exported", run_name="__main__", alter_sys=True)
