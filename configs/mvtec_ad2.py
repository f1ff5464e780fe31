"""MVTec AD 2 (8 scenarios, read in its own layout; thresholds from its validation split),
multi-class.

Defined in cras_jax/configs/mvtec_ad2.py; `--config=configs/mvtec_ad2.py` and `--config=mvtec_ad2`
name the same config.
"""

from cras_jax.configs.mvtec_ad2 import get_config  # noqa: F401
