"""The embedded default: a synthetic 4-class dataset, EfficientNet-Lite0, minutes on a CPU.

Defined in cras_jax/configs/demo.py; `--config=configs/demo.py` and `--config=demo` name the same config.
"""

from cras_jax.configs.demo import get_config  # noqa: F401
