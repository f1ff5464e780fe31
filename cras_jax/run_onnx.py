"""`python -m cras_jax.run_onnx`: Scores images with a model exported by `python -m cras_jax.export --format=onnx`, without JAX:.

The command's work is `cras_jax.deploy.run_onnx`'s (NumPy and the runtime only, no JAX); this module is its
entry point (`python -m cras_jax.run_onnx`, the same as `cras-jax run_onnx`).
"""

import sys

from cras_jax.deploy import run_onnx

if __name__ == "__main__":
  run_onnx.main()
  sys.exit(0)
