"""A disk cache of the frozen backbone's aggregated patch features t (docs/method.md §2).

The backbone is frozen and training has no augmentation, so t of every training
image is the same in every epoch and every later run with the same data,
backbone, weights and preprocessing. It is stored once as a memory-mapped .npy
(float16 by default) under a key hashing all of those, written to a temporary
name and renamed when complete, so an interrupted write is never reused. Beside it,
train_<key>.json records the SHA-256 of its bytes (and the prepared data it came from): a
file whose bytes changed since (overwritten in place, even at the same size) or that has no
record is recomputed, never reused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re

import numpy as np

from cras_jax.backbones import sources
from cras_jax.base import download, fileio, fs, leases

FORMAT_VERSION = 1
_CACHE = re.compile(r"train_[0-9a-f]+\.npy")
_TMP = re.compile(r"train_[0-9a-f]+\.npy\.tmp-(\d+)\.npy")


@dataclasses.dataclass(frozen=True)
class CacheSpec:
  """What determines the stored features, and where they are kept (built by runs/specs.py)."""

  backbone: str
  weights: str
  seed: int  # the seed that draws random weights (`population.backbone_seed`)
  levels: tuple[int, ...]
  patch_size: int
  pre_embed_dim: int
  embed_dim: int
  compute_dtype: str
  storage_dtype: str
  folder: str  # the cache folder; empty: <data cache folder>/features


def key(spec: CacheSpec, dataset) -> str:
  """A hash of everything that determines t for the training split."""
  fields = {
      "format": FORMAT_VERSION,
      "data": dataset.builder.builder_config.name,  # layout, content fingerprint, resize, crop
      "backbone": spec.backbone,
      "weights": sources.weights_source(spec.backbone, spec.weights).identity(),
      "seed": spec.seed if spec.weights == "random" else None,
      "levels": list(spec.levels),
      "patch_size": spec.patch_size,
      "pre_embed_dim": spec.pre_embed_dim,
      "embed_dim": spec.embed_dim,
      "compute_dtype": spec.compute_dtype,
      "storage": spec.storage_dtype,
  }
  return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def path(spec: CacheSpec, data_cache: str, cache_key: str) -> str:
  """The cache file: in spec.folder, by default <data_cache>/features."""
  root = spec.folder or os.path.join(data_cache, "features")
  return os.path.join(root, f"train_{cache_key}.npy")


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's live process
    return True
  return True


def remove_stale_temporaries(folder: str) -> list[str]:
  """Deletes the `<cache>.tmp-<pid>.npy` files of writers that no longer run (killed during
  their write) -> the removed paths."""
  removed = []
  if not os.path.isdir(folder):
    return removed
  for name in os.listdir(folder):
    m = _TMP.fullmatch(name)
    if m and not _pid_alive(int(m.group(1))):
      path = os.path.join(folder, name)
      try:
        os.remove(path)
      except OSError:
        continue
      removed.append(path)
  return removed


def _damage(file: str, shape: tuple) -> str | None:
  """Why the committed cache file cannot be used (truncated, unreadable header), or None."""
  try:
    with open(file, "rb") as f:
      version = np.lib.format.read_magic(f)
      read_header = (
          np.lib.format.read_array_header_1_0
          if version == (1, 0)
          else np.lib.format.read_array_header_2_0
      )
      header = read_header(f)  # (shape, fortran, dtype)
      offset = f.tell()
  except (OSError, ValueError, SyntaxError) as e:
    return f"unreadable header ({type(e).__name__}: {e})"
  got_shape, _, dtype = header
  want = offset + int(np.prod(got_shape, dtype=np.int64)) * np.dtype(dtype).itemsize
  size = os.path.getsize(file)
  if size != want:
    return f"{size} bytes where its header needs {want} (truncated or overwritten)"
  return None


def _source_file(file: str) -> str:
  return file[: -len(".npy")] + ".json"


def _changed(file: str) -> str | None:
  """Why the committed file's bytes are not the ones its record names, or None."""
  try:
    with open(_source_file(file)) as f:
      recorded = json.load(f).get("sha256")
  except (OSError, ValueError, AttributeError):
    recorded = None
  if not isinstance(recorded, str):
    return "it has no record of its contents (written by an older version, or the record is lost)"
  if download.sha256_file(file) != recorded:
    return "its bytes differ from those recorded when it was written (changed in place)"
  return None


def prune_unused(folder: str) -> list[str]:
  """Deletes the committed cache files whose prepared data no longer exists (it was pruned
  for newer contents, so the file can never be reused) and that no live process reads
  (`leases.in_use`) -> the removed paths. Files without a record of their data are kept."""
  removed = []
  if not os.path.isdir(folder):
    return removed
  for name in sorted(os.listdir(folder)):
    if not _CACHE.fullmatch(name):
      continue
    file = os.path.join(folder, name)
    try:
      with open(_source_file(file)) as f:
        data_dir = json.load(f)["data_dir"]
    except (OSError, ValueError, KeyError, TypeError):
      continue
    if os.path.isdir(data_dir) or leases.in_use(file):
      continue
    for p in (file, _source_file(file)):
      with contextlib.suppress(OSError):
        os.remove(p)
    removed.append(file)
  return removed


def load(file: str, shape: tuple) -> np.ndarray | None:
  """The cached features (memory-mapped), or None when absent, of another shape or damaged.
  First, under the folder's prune lock: stale temporaries of killed writers and files of
  pruned data that nothing reads are removed (`prune_unused`), and this process takes its
  reader lease on `file` (kept until it ends). A damaged (e.g. truncated) file is reported,
  deleted and so recomputed."""
  folder = os.path.dirname(file)
  fs.writable_dir(
      folder,
      "the feature cache directory",
      "set --config.train.feature_cache_dir (or data.cache_dir) to a writable directory",
  )
  with leases.exclusive(folder):
    for path in remove_stale_temporaries(folder):
      print(f"feature cache: removed {path} (left by an interrupted write)", flush=True)
    for path in prune_unused(folder):
      print(f"feature cache: removed {path} (its data was replaced; unused)", flush=True)
    leases.hold(file)
  if not os.path.exists(file):
    return None
  why = _damage(file, shape) or _changed(file)
  if why is not None:
    print(f"feature cache: {file} cannot be reused ({why}); recomputing it", flush=True)
    os.remove(file)
    return None
  arr = np.load(file, mmap_mode="r")
  return arr if arr.shape == tuple(shape) else None


class Writer:
  """Writes features into a temporary memory-mapped file; `commit` renames it, `abort`
  removes it. The file's blocks are reserved first (`fs.reserve`): a cache that does not
  fit on its disk is refused with the sizes, never left to die on SIGBUS mid-write."""

  FIX = (
      "free some space, set --config.train.feature_cache_dir=<a disk with room>, or train "
      "without the cache (--config.train.cache_features=False)"
  )

  def __init__(self, file: str, shape: tuple, dtype: str, data_dir: str | None = None):
    folder = os.path.dirname(file)
    fs.writable_dir(
        folder,
        "the feature cache directory",
        "set --config.train.feature_cache_dir (or data.cache_dir) to a writable directory",
    )
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    fs.check_free_space(
        folder, nbytes, f"the feature cache ({describe_size(shape, dtype)})", self.FIX
    )
    self.file, self.tmp = file, f"{file}.tmp-{os.getpid()}.npy"
    self.data_dir = data_dir
    self.array = np.lib.format.open_memmap(
        self.tmp, mode="w+", dtype=np.dtype(dtype), shape=tuple(shape)
    )
    try:
      fs.reserve(self.tmp, os.path.getsize(self.tmp), "the feature cache", self.FIX)
    except BaseException:
      self.abort()
      raise

  def commit(self) -> np.ndarray:
    self.array.flush()
    del self.array
    record = {
        "sha256": download.sha256_file(self.tmp)
    }  # what `load` checks before reusing the file
    if self.data_dir is not None:  # what the file was computed from (`prune_unused`)
      record["data_dir"] = os.path.abspath(self.data_dir)
    fileio.atomic_write_json(_source_file(self.file), record)
    os.replace(self.tmp, self.file)
    return np.load(self.file, mmap_mode="r")

  def abort(self) -> None:
    """Drops the temporary file (a stopped or failed write)."""
    if hasattr(self, "array"):
      del self.array
    with contextlib.suppress(OSError):
      os.remove(self.tmp)


def describe_size(shape: tuple, dtype: str) -> str:
  n = int(np.prod(shape)) * np.dtype(dtype).itemsize
  per = n / shape[0] if shape[0] else 0
  return f"{n / 2**20:.1f} MiB ({per / 2**10:.1f} KiB per image, {dtype})"
