"""VisA (12 classes, converted to the MVTec layout), multi-class.

Defined in cras_jax/configs/visa.py; `--config=configs/visa.py` and `--config=visa` name the same config.
"""

from cras_jax.configs.visa import get_config  # noqa: F401
