"""MVTec AD, multi-class, with the paper's defaults (docs/method.md §11).

python -m cras_jax.main --config=configs/mvtec.py --workdir=runs/mvtec

The backbone's torchvision ImageNet weights are fetched by name into the user cache; the
dataset is read from data.root, or, with data.root empty, from <data.data_dir>/<name>
(fetched there when it has a public address or data.download_url gives one; otherwise the
message says where to get it and where to put it). docs/data.md "Datasets and weights by name".
"""

import ml_collections

from cras_jax.base import registry, schema

MVTEC_CLASSES = registry.MVTEC_CLASSES  # the registry's list (one table)


def get_config() -> ml_collections.ConfigDict:
  """The schema's defaults (cras_jax/base/schema.py, listed in docs/config.md), the paper's
  settings, with MVTec AD's 15 classes."""
  config = schema.default_config()
  config.data.classes = MVTEC_CLASSES
  return config


def for_dataset(name: str) -> ml_collections.ConfigDict:
  """The paper's settings (`get_config`) on the registered dataset `name`, all its classes:
  the shipped configs of the other paper datasets are this with their name."""
  config = get_config()
  config.data.name = name
  config.data.classes = registry.dataset(name).classes
  return config
