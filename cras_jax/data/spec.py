"""What the data layer needs of a config, as one small frozen value (built by runs/specs.py)."""

from __future__ import annotations

import dataclasses

from cras_jax.data import preprocess
from cras_jax.data.fetch import FetchSpec


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
  """The generated demo set (`synthetic.generate`)."""

  seed: int
  image_size: int
  n_train: int
  n_test_good: int
  n_test_defect_per_type: int


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """A dataset to prepare and load: where it is, which classes, how images are preprocessed."""

  name: str
  root: str  # empty: the synthetic set's default folder (an error for other datasets)
  classes: tuple[str, ...]  # empty: the registry's list of `name`, else discovered
  cache_dir: str  # empty: <workdir>/data_cache
  resize: int
  crop: int
  allow_image_level_only: bool
  mask_rule: str
  limits: preprocess.Limits
  synthetic: SyntheticSpec
  # A registered dataset fetched and prepared by name when `root` is empty (`fetch.ensure`).
  fetch: FetchSpec | None = None
  # name "combined": the datasets whose classes it reads together (`data/combined.py`)
  sources: tuple[str, ...] = ()
