"""The named datasets (``config.data.name``): a view of the one registry, `base.registry`.

Every dataset is read in the MVTec layout (``layout.EXPECTED_LAYOUT``) by
``cras_jax.data.mvtec``. BTAD's own layout (``train/ok``, ``test/ok``, ``test/ko``,
``ground_truth/ko/<name>.png`` or ``.bmp``) is read as it is (``ok`` is "good"); VisA's original
release is converted first (``cras_jax.data.fetch`` does it after a download;
``python -m tools.convert_visa`` by hand). ``folder`` discovers its classes from the
sub-folders of the root (those holding ``train/`` or ``test/``).
"""

from __future__ import annotations

from cras_jax.base import registry
from cras_jax.base.registry import (  # noqa: F401 - re-exported: the data layer's names
    BTAD_CLASSES,
    ITDD_CLASSES,
    MPDD_CLASSES,
    MVTEC_CLASSES,
    VISA_CLASSES,
    DatasetSpec,
    resolve_classes,
)

REGISTRY: dict[str, DatasetSpec] = registry.DATASETS
get = registry.dataset
