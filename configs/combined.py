"""One model across datasets (MVTec AD + VisA + MPDD classes together), multi-class.

Defined in cras_jax/configs/combined.py; `--config=configs/combined.py` and `--config=combined`
name the same config.
"""

from cras_jax.configs.combined import get_config  # noqa: F401
