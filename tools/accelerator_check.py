"""`python -m tools.accelerator_check` runs `python -m cras_jax.accelerator_check` (the repository's short form)."""

import runpy

if __name__ == "__main__":
  runpy.run_module("cras_jax.accelerator_check", run_name="__main__", alter_sys=True)
