"""Real-IAD (30 categories x 5 views, read as released through its JSON splits), multi-class.

Defined in cras_jax/configs/real_iad.py; `--config=configs/real_iad.py` and `--config=real_iad`
name the same config.
"""

from cras_jax.configs.real_iad import get_config  # noqa: F401
