"""MVTec AD, multi-class, with the paper's defaults (docs/method.md §11).

python -m cras_jax.main --config=configs/mvtec.py --workdir=runs/mvtec \
    --config.data.root=<MVTec AD directory> --config.model.weights=<wide_resnet50_2 weights>
"""

import ml_collections

from cras_jax.base import schema

MVTEC_CLASSES = (
    "bottle",
    "cable",
    "capsule",
    "carpet",
    "grid",
    "hazelnut",
    "leather",
    "metal_nut",
    "pill",
    "screw",
    "tile",
    "toothbrush",
    "transistor",
    "wood",
    "zipper",
)


def get_config() -> ml_collections.ConfigDict:
  """The schema's defaults (cras_jax/base/schema.py, listed in docs/config.md), the paper's
  settings, with MVTec AD's 15 classes."""
  config = schema.default_config()
  config.data.classes = MVTEC_CLASSES
  return config
