"""Preparing a split in bounded host memory: tfds' example shuffler replaced, for the builds of
`mvtec.load_dataset`, by one that spills every serialized example to a file as it comes.

tfds' writer hands each serialized example to `tensorflow_datasets.core.shuffle.Shuffler`,
which keeps them in memory up to 1 GB and then spills them to bucket files through
`tf.io.gfile` (TensorFlow, which cras_jax does not install); with `disable_shuffling`, as the
prepared copies ask (entry i of a split is record i), all of a split's keys fall in one bucket,
which is read back whole to sort it. Either way the host holds about the largest split: some
50 GB for Real-IAD at 288 px. The builder's generator yields its examples in key order
(`mvtec_builder.MVTecFolder._generate_examples`: 0, 1, 2, ...), so nothing needs sorting:
`SequentialSpill` appends each example to one temporary file in the split's (incomplete)
output folder and reads them back in the same order when the shards are written. The shards
are the same bytes as the in-memory path's (tests/data/test_spill.py); the host holds one
example at a time, and the disk holds the split twice until its shards are written.
"""

from __future__ import annotations

import contextlib
import os
import struct
import uuid
from collections.abc import Iterator

from tensorflow_datasets.core import shuffle as tfds_shuffle

_HEAD = struct.Struct("=QQ")  # key, size


class SequentialSpill:
  """A drop-in for tfds' `Shuffler` (its constructor, `add`, `size`, `bucket_lengths`,
  `num_examples`, iteration) for examples added in increasing key order with shuffling
  disabled: one temporary file, written as they come, read back once in the same order."""

  def __init__(
      self, dirpath, hash_salt=None, disable_shuffling: bool = False, ignore_duplicates=False
  ):
    del hash_salt, ignore_duplicates  # keys are never hashed: the order is the keys'
    if not disable_shuffling:
      raise ValueError("SequentialSpill writes examples in key order: shuffling must be off")
    os.makedirs(os.fspath(dirpath), exist_ok=True)
    self._path = os.path.join(os.fspath(dirpath), f"spill_{uuid.uuid4().hex}.tmp")
    self._file = open(self._path, "wb")  # noqa: SIM115 - closed by __iter__ or __del__
    self._last: int | None = None
    self._count = 0
    self._bytes = 0

  @property
  def size(self) -> int:
    return self._bytes

  @property
  def bucket_lengths(self) -> list[int]:
    return [self._count]

  @property
  def num_examples(self) -> int:
    return self._count

  def add(self, key, data: bytes) -> None:
    if not isinstance(key, int) or isinstance(key, bool):
      raise TypeError(f"SequentialSpill needs integer keys, got {key!r}")
    if self._last is not None and key <= self._last:
      raise ValueError(f"example key {key} after {self._last}: keys must increase")
    self._file.write(_HEAD.pack(key, len(data)))
    self._file.write(data)
    self._last = key
    self._count += 1
    self._bytes += len(data)

  def __iter__(self) -> Iterator[tuple[int, bytes]]:
    self._file.close()
    try:
      with open(self._path, "rb") as f:
        for _ in range(self._count):
          key, size = _HEAD.unpack(f.read(_HEAD.size))
          yield key, f.read(size)
    finally:
      self._remove()

  def _remove(self) -> None:
    if not hasattr(self, "_file"):  # the constructor refused
      return
    self._file.close()
    with contextlib.suppress(FileNotFoundError):
      os.remove(self._path)

  def __del__(self):
    self._remove()


@contextlib.contextmanager
def sequential_spill():
  """tfds' writers, while in the block, spill with `SequentialSpill`."""
  old = tfds_shuffle.Shuffler
  tfds_shuffle.Shuffler = SequentialSpill
  try:
    yield
  finally:
    tfds_shuffle.Shuffler = old
