"""The loader's rate: prepared dataset -> device batch, images/s, against worker threads
(cras_jax/data/loader.py), measured by the benchmark beside the step it feeds."""

from __future__ import annotations

import os
import time

import jax
import numpy as np
from PIL import Image

from cras_jax.data import loader, mvtec
from cras_jax.engine import sharding


def synthetic_source(root: str, image_size: int, n_images: int, seed: int = 0):
  """A prepared (TFDS array_record) training split of `n_images` random images at
  `image_size`, built under `root` (MVTec layout, one class)."""
  rng = np.random.default_rng(seed)
  good = os.path.join(root, "images", "part", "train", "good")
  os.makedirs(good, exist_ok=True)
  os.makedirs(os.path.join(root, "images", "part", "test", "good"), exist_ok=True)
  for i in range(n_images):
    img = rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
    Image.fromarray(img).save(os.path.join(good, f"{i:04d}.png"))
  Image.fromarray(img).save(os.path.join(root, "images", "part", "test", "good", "0000.png"))
  ds = mvtec.load_dataset(
      os.path.join(root, "images"), None, image_size, image_size, os.path.join(root, "cache"),
      verbose=False,
  )  # fmt: skip
  return ds.train


def loader_rate(source, batch_size: int, workers: int, devs, seconds: float = 2.0) -> dict:
  """images/s of reading shuffled batches with `workers` threads and putting them on the
  devices (as the training loop does, without the step), for about `seconds`."""
  devices = sharding.Devices(devices=list(devs))
  n = len(source)
  rng = np.random.default_rng(0)
  with loader.BatchReader(source, workers) as reader:
    reader.read(rng.permutation(n)[:batch_size], ("image", "label"))  # warm
    images, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
      idx = rng.permutation(n)[:batch_size]
      batch = devices.put_batch(reader.read(idx, ("image", "label")))
      jax.block_until_ready(batch)
      images += len(idx)
    wall = time.perf_counter() - t0
  return {"workers": reader.workers, "batch_size": batch_size, "images_per_s": images / wall}
