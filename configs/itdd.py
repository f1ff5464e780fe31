"""ITDD (4 classes of industrial textiles), multi-class.

Defined in cras_jax/configs/itdd.py; `--config=configs/itdd.py` and `--config=itdd` name the same config.
"""

from cras_jax.configs.itdd import get_config  # noqa: F401
