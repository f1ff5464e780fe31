"""BTAD (beanTech, 3 products), multi-class, read in its own layout (train/ok, test/ok,

Defined in cras_jax/configs/btad.py; `--config=configs/btad.py` and `--config=btad` name the same config.
"""

from cras_jax.configs.btad import get_config  # noqa: F401
