"""Shared by tests/test_predict.py and tests/test_export.py: the tiny run loaded once per
session, its test images and the in-framework predict step on them."""

import functools
import glob
import os

import numpy as np

from cras_jax.data import preprocess
from cras_jax.runs import trained
from cras_jax.scoring import scoring


@functools.lru_cache(maxsize=None)
def loaded_run(workdir: str):
  return trained.load_run(workdir)


def image_paths(data_root) -> list[str]:
  """The tiny run's test images, in the evaluation's order (class, type, file)."""
  return sorted(glob.glob(os.path.join(str(data_root), "*", "test", "*", "*.png")))


def crops(paths, config) -> np.ndarray:
  """The preprocessed uint8 crops, read by the dataset loader's function."""
  return np.stack(
      [preprocess.load_example(p, None, config.data.resize, config.data.crop)[0] for p in paths]
  )


@functools.lru_cache(maxsize=None)
def reference_outputs(workdir: str, data_root: str):
  """(crops, the run's predict step outputs) on all test images in one batch."""
  run = loaded_run(workdir)
  images = crops(image_paths(data_root), run.config)
  scorer = scoring.Scorer.for_run(run, len(images))
  out = scorer.predict_step(scorer.svars, run.devices.put_batch({"image": images})["image"])
  return images, {k: np.asarray(v) for k, v in out.items()}
