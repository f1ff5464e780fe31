"""MPDD (6 classes of metal parts), multi-class.

Defined in cras_jax/configs/mpdd.py; `--config=configs/mpdd.py` and `--config=mpdd` name the same config.
"""

from cras_jax.configs.mpdd import get_config  # noqa: F401
