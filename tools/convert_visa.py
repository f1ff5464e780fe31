"""`python -m tools.convert_visa` runs `python -m cras_jax.convert_visa` (the repository's short form)."""

import runpy

if __name__ == "__main__":
  runpy.run_module("cras_jax.convert_visa", run_name="__main__", alter_sys=True)
