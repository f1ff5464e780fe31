"""`python -m cras_jax.run_onnx` (`cras-jax run_onnx`): score images with an exported .onnx, without
JAX (onnxruntime or OpenVINO). The command's flags and work are `cras_jax.deploy.run_onnx`'s."""

import sys

from cras_jax.deploy import run_onnx

if __name__ == "__main__":
  run_onnx.main()
  sys.exit(0)
