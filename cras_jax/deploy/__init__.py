"""Deployment: the export of a run's scoring function (`exporting`: the `.npz` of jax.export;
`onnx_export` with the jaxpr-to-ONNX converter `onnx_base`, `onnx_rules`, `onnx_linalg`,
`onnx_graph`), the scorers that run the exports without cras_jax's JAX code (`run_exported`:
JAX and NumPy; `run_onnx`: no JAX), and their benchmark (`bench`).

This package's `__init__` imports nothing, so `run_onnx` stays free of JAX."""
