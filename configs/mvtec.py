"""MVTec AD, multi-class, with the paper's defaults (docs/method.md §11).

Defined in cras_jax/configs/mvtec.py; `--config=configs/mvtec.py` and `--config=mvtec` name the same config.
"""

from cras_jax.configs.mvtec import get_config  # noqa: F401
