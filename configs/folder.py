"""Your own images in the MVTec layout, offline, on a CPU: EfficientNet-Lite0 (ImageNet weights

Defined in cras_jax/configs/folder.py; `--config=configs/folder.py` and `--config=folder` name the same config.
"""

from cras_jax.configs.folder import get_config  # noqa: F401
