"""Reading batches of a prepared dataset with worker threads (`config.data.workers`).

A batch of indices is split into contiguous chunks, one per worker; each worker reads its
chunk from the TFDS array_record data source (decompression and copying release the GIL) and
the chunks are concatenated in order. The batch is therefore exactly `data.get_batch(source,
indices)` for any worker count: the data order stays a pure function of (seed, epoch)
(training/loop.py `batch_indices`) and a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from cras_jax.data import mvtec

MAX_DEFAULT_WORKERS = 8


def default_workers() -> int:
  """One worker per host core, at most MAX_DEFAULT_WORKERS."""
  return max(1, min(os.cpu_count() or 1, MAX_DEFAULT_WORKERS))


def _concat(parts: list[dict]) -> dict:
  out = {}
  for k in parts[0]:
    if isinstance(parts[0][k], np.ndarray):
      out[k] = np.concatenate([p[k] for p in parts])
    else:
      out[k] = [x for p in parts for x in p[k]]
  return out


class BatchReader:
  """`read(indices, keys)` = `data.get_batch(source, indices, keys)`, read by `workers`
  threads (0: `default_workers()`); `close()` (or a `with` block) stops them."""

  def __init__(self, source, workers: int = 0):
    self.source = source
    self.workers = int(workers) or default_workers()
    self._pool = ThreadPoolExecutor(self.workers) if self.workers > 1 else None

  def read(self, indices, keys: Sequence[str] | None = None) -> dict:
    idx = np.asarray(indices).reshape(-1)
    if self._pool is None or len(idx) < 2:
      parts = [mvtec.get_batch(self.source, idx)]
    else:
      chunks = [c for c in np.array_split(idx, min(self.workers, len(idx))) if len(c)]
      parts = list(self._pool.map(lambda c: mvtec.get_batch(self.source, c), chunks))
    batch = _concat(parts)
    return {k: batch[k] for k in keys} if keys is not None else batch

  def close(self) -> None:
    if self._pool is not None:
      self._pool.shutdown(wait=False, cancel_futures=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
    return False
