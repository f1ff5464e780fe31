"""Where a training run reads its batches (`data.on_device`): the training set put on the
devices once (`engine.resident.Resident`), or each batch read on the host (`None`).

The decision (`engine.resident.decide`) is printed as one line. "auto" compiles nothing on a
backend whose devices report no memory limit (the CPU); elsewhere it compares the rows each
device would hold plus the compiled step's footprint with the device's memory.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from cras_jax.engine import resident


def example_batch(devices, key: str, rows: tuple, dtype, batch_size: int, members: int):
  """Shapes of one training batch as the loop puts it (a leading member axis for `members`:
  a per-member order), for lowering the step."""
  lead = (members, batch_size) if members else (batch_size,)
  where = devices.member_batch if members else devices.batch
  return {
      key: jax.ShapeDtypeStruct(lead + rows, dtype, sharding=where),
      "label": jax.ShapeDtypeStruct(lead, np.int32, sharding=where),
  }


def step_bytes(train_step: Callable, state, batch) -> int | None:
  """The compiled step's footprint (None where the step is not one compiled program, e.g. a
  population's "map" form, or the backend has no memory analysis)."""
  if not hasattr(train_step, "lower"):
    return None
  return resident.step_footprint(train_step.lower(state, batch).compile())


def place(
    config,
    devices,
    train_step: Callable,
    state,
    n: int,
    cache=None,
    reader=None,
    per_member: int = 0,
) -> resident.Resident | None:
  """The training set on the devices where `data.on_device` says so, else None.

  cache: the stored features (an array [n, patches, dim], read by rows) or None: the images,
  read by `reader` (`data.loader.BatchReader`) at the crop size. per_member: a population's
  size when each member reads its own batch (the step's batch has a leading member axis)."""
  setting = config.data.on_device
  if cache is not None:
    what, key, rows, dtype = "the stored features", "features", cache.shape[1:], cache.dtype
    read = lambda lo, hi: np.asarray(cache[lo:hi])
  else:
    crop = config.data.crop
    what, key, rows, dtype = "the training images", "image", (crop, crop, 3), np.uint8
    read = lambda lo, hi: reader.read(np.arange(lo, hi), ("image",))["image"]
  shards = devices.mesh.shape[resident.AXIS]
  row_bytes = int(np.prod(rows)) * np.dtype(dtype).itemsize
  per_device = resident.bytes_per_device(n, shards, row_bytes)
  limit = None if setting == "false" else resident.device_limit(devices.mesh.devices.flat)
  footprint = None
  if limit:  # an accelerator: what the step itself needs
    batch = example_batch(devices, key, rows, dtype, config.train.batch_size, per_member)
    footprint = step_bytes(train_step, state, batch)
  decision = resident.decide(setting, what, per_device, footprint, limit)
  print(decision.why, flush=True)
  if not decision.on_device:
    return None
  return resident.Resident(devices, n, rows, dtype, read)
