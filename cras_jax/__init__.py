"""cras_jax: CRAS (Center-aware Residual Anomaly Synthesis) in JAX/Flax."""

__version__ = "0.3.0"
