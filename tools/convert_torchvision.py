"""`python -m tools.convert_torchvision` runs `python -m cras_jax.convert_torchvision` (the repository's short form)."""

import runpy

if __name__ == "__main__":
  runpy.run_module("cras_jax.convert_torchvision", run_name="__main__", alter_sys=True)
