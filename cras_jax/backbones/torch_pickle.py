"""Read a PyTorch ``state_dict`` file into numpy arrays without importing torch.

``torch.save`` writes either the *legacy* format (torch < 1.6, or
``_use_new_zipfile_serialization=False``)::

    pickle(MAGIC_NUMBER) pickle(PROTOCOL_VERSION=1001) pickle(sys_info)
    pickle(obj)                       # tensors reference storages by persistent id
    pickle(sorted list of storage keys)
    for each key: int64 LE element count, then the raw little-endian bytes

or the *zip* format (the default since torch 1.6)::

    <prefix>/data.pkl                 # pickle(obj), same persistent ids
    <prefix>/data/<key>               # raw bytes of each storage
    <prefix>/byteorder                # "little" or "big" (absent in old files: little)

A tensor is pickled as ``torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, requires_grad, backward_hooks[, metadata])`` and a storage as the persistent
id ``('storage', torch.<Type>Storage, key, location, numel[, view_metadata])``
(the 6th item only in the legacy format). Offsets, sizes and strides count elements.

Pickle is code: loading it with the stock unpickler can run arbitrary functions.
:class:`_RestrictedUnpickler` resolves only an explicit allow-list of globals (the
ones a plain tensor state dict needs) to *inert stand-ins defined here*; nothing
from torch is ever imported or called. Any other global raises
:class:`TorchPickleError` (a :class:`pickle.UnpicklingError`) naming the global and
the file, before anything could run.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any

import numpy as np

from cras_jax.backbones.torch_types import (
    _STORAGE_DTYPES,
    _TORCH_DTYPES,
    _StorageType,
    _TorchDType,
)
from cras_jax.base import errors

__all__ = ["TorchPickleError", "load_torch_state_dict", "ALLOWED_GLOBALS"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
MAX_PICKLE_BYTES = 64 * 2**20  # data.pkl of a state dict: names and geometry, kilobytes


class TorchPickleError(pickle.UnpicklingError, errors.UserError):
  """The file is not a readable, plain PyTorch tensor state dict."""


class _StorageRef:
  """A (view of a) storage referenced by persistent id; data filled in later."""

  __slots__ = ("key", "dtype", "numel", "offset", "view_numel")

  def __init__(
      self, key: str, dtype: np.dtype, numel: int, offset: int = 0, view_numel: int | None = None
  ):
    self.key, self.dtype, self.numel = key, dtype, numel
    self.offset = offset  # elements into the root storage
    self.view_numel = numel if view_numel is None else view_numel


class _TensorRef:
  __slots__ = ("storage", "offset", "size", "stride")

  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
):
  if not isinstance(storage, _StorageRef):
    raise TorchPickleError(f"tensor rebuilt from a non-storage object {type(storage).__name__}")
  if metadata and any(bool(v) for v in dict(metadata).values()):
    raise TorchPickleError(f"tensor metadata {metadata!r} (conj/neg bits) is not supported")
  try:
    size = tuple(int(s) for s in size)
    stride = tuple(int(s) for s in stride)
    storage_offset = int(storage_offset)
  except (TypeError, ValueError) as e:
    raise TorchPickleError(f"bad tensor geometry: {e}") from None
  if len(size) != len(stride):
    raise TorchPickleError(f"tensor size {size} and stride {stride} differ in length")
  return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state):
  if not isinstance(data, _TensorRef):
    raise TorchPickleError("parameter rebuilt from a non-tensor object")
  return data


def _make_allowed() -> dict[tuple[str, str], Any]:
  allowed: dict[tuple[str, str], Any] = {
      ("collections", "OrderedDict"): collections.OrderedDict,
      ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
      ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
      ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
  }
  for name, dt in _STORAGE_DTYPES.items():
    allowed[("torch", name)] = _StorageType(name, dt)
  for name, dt in _TORCH_DTYPES.items():
    allowed[("torch", name)] = _TorchDType(name, dt)
  return allowed


#: The only globals a state-dict pickle may reference, mapped to inert stand-ins.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = _make_allowed()


class _RestrictedUnpickler(pickle._Unpickler):  # noqa: SLF001 - the Python one: BUILD hook
  """Unpickler that resolves only :data:`ALLOWED_GLOBALS` (to local stand-ins).

  The pure-Python unpickler, so that the ``BUILD`` opcode (set an object's state) can be
  checked: it is allowed only on the fresh ``OrderedDict`` a state dict is (torch sets its
  ``_metadata`` that way), never on the shared stand-ins, functions or tensor records, which
  it would change for every later load in the process."""

  dispatch = dict(pickle._Unpickler.dispatch)  # noqa: SLF001

  def __init__(self, file, source: str, persistent=None):
    super().__init__(file)
    self._source = source
    self._persistent = persistent

  def load_build(self):
    target = self.stack[-2] if len(self.stack) >= 2 else None
    if type(target) is not collections.OrderedDict:
      raise TorchPickleError(
          f"{self._source}: the pickle sets the state of a {type(target).__name__} (BUILD); "
          "only a state dict's OrderedDict may carry state"
      )
    super().load_build()

  dispatch[pickle.BUILD[0]] = load_build

  def find_class(self, module, name):
    try:
      return ALLOWED_GLOBALS[(module, name)]
    except (KeyError, TypeError):
      raise TorchPickleError(
          f"{self._source}: forbidden global '{module}.{name}' in the pickle; only plain "
          "tensor state dicts can be read (allowed: collections.OrderedDict, "
          "torch._utils._rebuild_tensor_v2/_rebuild_parameter, torch.*Storage, torch dtypes)"
      ) from None

  def persistent_load(self, pid):
    if self._persistent is None:
      raise TorchPickleError(f"{self._source}: unexpected persistent id {pid!r}")
    return self._persistent(pid)


def _ascii(x) -> str:
  return x.decode("ascii") if isinstance(x, bytes) else str(x)


def _parse_storage_pid(pid, source: str):
  """-> (storage_type, key, numel, view_metadata or None)."""
  if not isinstance(pid, tuple) or not pid or _ascii(pid[0]) != "storage":
    raise TorchPickleError(f"{source}: unsupported persistent id {pid!r}")
  if len(pid) == 5:
    _, stype, key, _location, numel = pid
    view = None
  elif len(pid) == 6:
    _, stype, key, _location, numel, view = pid
  else:
    raise TorchPickleError(f"{source}: malformed storage id {pid!r}")
  if not isinstance(stype, _StorageType):
    raise TorchPickleError(f"{source}: storage id with unknown storage type {stype!r}")
  if not isinstance(numel, int) or numel < 0:
    raise TorchPickleError(f"{source}: bad storage size {numel!r}")
  return stype, _ascii(key), numel, view


def _materialise(
    t: _TensorRef, storages: dict[str, np.ndarray], source: str, name: str
) -> np.ndarray:
  ref = t.storage
  root = storages[ref.key]
  dtype = ref.dtype
  # the storage this tensor sees (a legacy view is a window of its root storage)
  if ref.offset + ref.view_numel > root.size:
    raise TorchPickleError(f"{source}: storage view of '{name}' exceeds its storage")
  flat = root[ref.offset : ref.offset + ref.view_numel]
  if flat.dtype.newbyteorder("=") != dtype.newbyteorder("="):
    raise TorchPickleError(
        f"{source}: storage '{ref.key}' read with two dtypes ({flat.dtype} and {dtype})"
    )
  dtype = flat.dtype  # carries the byte order of the stored data
  size, stride, off = t.size, t.stride, t.offset
  if any(s < 0 for s in size) or any(s < 0 for s in stride) or off < 0:
    raise TorchPickleError(f"{source}: negative size/stride/offset in '{name}'")
  n = 1
  for s in size:  # Python ints: no overflow
    n *= s
  if n == 0:
    return np.zeros(size, dtype=dtype.newbyteorder("="))
  if n > flat.size or any(st == 0 and s > 1 for s, st in zip(size, stride)):
    # e.g. stride 0: a 549-byte file declaring a 1 GiB tensor over one element
    raise TorchPickleError(
        f"{source}: tensor '{name}' (size {size}, stride {stride}) has more elements than "
        f"its storage of {flat.size} (repeated by zero strides); not a saved parameter"
    )
  last = off + sum((s - 1) * st for s, st in zip(size, stride))
  if last >= flat.size:
    raise TorchPickleError(
        f"{source}: tensor '{name}' (offset {off}, size {size}, stride {stride}) "
        f"reads past its storage of {flat.size} elements"
    )
  base = flat[off:]
  view = np.lib.stride_tricks.as_strided(
      base, shape=size, strides=tuple(st * dtype.itemsize for st in stride), writeable=False
  )
  return np.array(view, dtype=dtype.newbyteorder("="), order="C", copy=True)


def _collect(obj, storages, source: str) -> dict[str, np.ndarray]:
  if not isinstance(obj, dict):
    raise TorchPickleError(
        f"{source}: expected a state dict (a mapping of names to tensors), "
        f"got {type(obj).__name__}"
    )
  out: dict[str, np.ndarray] = {}
  bad = []
  for k, v in obj.items():
    if not isinstance(k, str) or not isinstance(v, _TensorRef):
      bad.append(f"{k!r}: {type(v).__name__}")
      continue
    out[k] = _materialise(v, storages, source, k)
  if bad:
    raise TorchPickleError(
        f"{source}: state dict entries that are not tensors: {', '.join(bad[:10])}"
        + (" ..." if len(bad) > 10 else "")
    )
  return out


def _load_legacy(f: io.BufferedIOBase, source: str) -> dict[str, np.ndarray]:
  def plain_load():
    return _RestrictedUnpickler(f, source).load()

  magic = plain_load()
  if magic != _LEGACY_MAGIC:
    raise TorchPickleError(f"{source}: not a PyTorch file (bad magic number)")
  protocol = plain_load()
  if protocol != _LEGACY_PROTOCOL:
    raise TorchPickleError(f"{source}: unsupported legacy protocol version {protocol!r}")
  sys_info = plain_load()
  if isinstance(sys_info, dict) and sys_info.get("little_endian", True) is False:
    raise TorchPickleError(f"{source}: big-endian legacy files are not supported")

  refs: dict[str, tuple[np.dtype, int]] = {}  # root key -> (dtype, numel)
  views: dict[str, _StorageRef] = {}

  def persistent(pid):
    stype, key, numel, view = _parse_storage_pid(pid, source)
    dtype = stype.dtype
    if key in refs and refs[key] != (dtype, numel):
      raise TorchPickleError(f"{source}: storage '{key}' referenced inconsistently")
    refs[key] = (dtype, numel)
    if view is None:
      return _StorageRef(key, dtype, numel)
    view_key, offset, view_numel = view
    view_key = _ascii(view_key)
    if view_key not in views:
      views[view_key] = _StorageRef(key, dtype, numel, int(offset), int(view_numel))
    return views[view_key]

  obj = _RestrictedUnpickler(f, source, persistent).load()
  keys = plain_load()
  if not isinstance(keys, list):
    raise TorchPickleError(f"{source}: malformed storage key list")
  storages: dict[str, np.ndarray] = {}
  for key in map(_ascii, keys):
    if key not in refs:
      raise TorchPickleError(f"{source}: storage '{key}' is listed but never referenced")
    dtype, numel = refs[key]
    head = f.read(8)
    if len(head) != 8:
      raise TorchPickleError(f"{source}: truncated file (storage '{key}' header missing)")
    (count,) = struct.unpack("<q", head)
    if count != numel:
      raise TorchPickleError(
          f"{source}: storage '{key}' holds {count} elements, the pickle says {numel}"
      )
    nbytes = count * dtype.itemsize
    data = f.read(nbytes)
    if len(data) != nbytes:
      raise TorchPickleError(
          f"{source}: truncated file (storage '{key}' has {len(data)} of {nbytes} bytes)"
      )
    storages[key] = np.frombuffer(data, dtype=dtype.newbyteorder("<"))
  missing = sorted(set(refs) - set(storages))
  if missing:
    raise TorchPickleError(f"{source}: storages referenced but not stored: {missing[:10]}")
  return _collect(obj, storages, source)


def _load_zip(path: str, source: str) -> dict[str, np.ndarray]:
  archive_size = os.path.getsize(path)
  try:
    zf = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError) as e:
    raise TorchPickleError(f"{source}: unreadable zip archive ({e}); truncated file?") from None
  with zf:
    names = zf.namelist()
    pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
      raise TorchPickleError(
          f"{source}: zip archive without exactly one '<name>/data.pkl' "
          "entry; not a torch.save file"
      )
    prefix = pkl[0][: -len("data.pkl")]
    byteorder = "little"
    if prefix + "byteorder" in names:
      byteorder = zf.read(prefix + "byteorder").decode("ascii", "replace").strip()
      if byteorder not in ("little", "big"):
        raise TorchPickleError(f"{source}: unknown byte order {byteorder!r}")
    order = "<" if byteorder == "little" else ">"
    storages: dict[str, np.ndarray] = {}

    def persistent(pid):
      stype, key, numel, view = _parse_storage_pid(pid, source)
      if view is not None:
        raise TorchPickleError(f"{source}: storage views are not expected in zip files")
      dtype = stype.dtype
      if key not in storages:
        entry = f"{prefix}data/{key}"
        try:
          info = zf.getinfo(entry)
        except KeyError:
          raise TorchPickleError(f"{source}: missing storage entry '{entry}'") from None
        nbytes = numel * dtype.itemsize
        # torch.save stores storages uncompressed: a declared size is bounded by the bytes
        # really in the archive (a deflate bomb declares gigabytes in a few kilobytes).
        if info.compress_type != zipfile.ZIP_STORED:
          raise TorchPickleError(
              f"{source}: storage entry '{entry}' is compressed; torch.save stores them "
              "uncompressed"
          )
        if info.file_size < nbytes or nbytes > archive_size:
          raise TorchPickleError(
              f"{source}: storage '{key}' has {info.file_size} bytes, expected {nbytes}"
          )
        with zf.open(info) as fh:
          data = fh.read(nbytes)
        if len(data) < nbytes:
          raise TorchPickleError(
              f"{source}: storage '{key}' has {len(data)} bytes, expected {nbytes}"
          )
        storages[key] = np.frombuffer(data, dtype=dtype.newbyteorder(order), count=numel)
      elif storages[key].dtype.newbyteorder("=") != dtype.newbyteorder("="):
        raise TorchPickleError(f"{source}: storage '{key}' referenced with two dtypes")
      return _StorageRef(key, storages[key].dtype, numel)

    try:
      info = zf.getinfo(pkl[0])
      limit = max(MAX_PICKLE_BYTES, 100 * archive_size)
      if info.file_size > limit:
        raise TorchPickleError(
            f"{source}: {pkl[0]} declares {info.file_size} bytes ({archive_size} in the file)"
        )
      with zf.open(info) as fh:
        data_pkl = fh.read(limit + 1)
      if len(data_pkl) > limit:
        raise TorchPickleError(f"{source}: {pkl[0]} decompresses to more than {limit} bytes")
    except (zipfile.BadZipFile, OSError, EOFError) as e:
      raise TorchPickleError(f"{source}: corrupt zip entry {pkl[0]} ({e})") from None
    try:
      obj = _RestrictedUnpickler(io.BytesIO(data_pkl), source, persistent).load()
    except (zipfile.BadZipFile, EOFError, OSError) as e:
      raise TorchPickleError(f"{source}: corrupt archive ({e})") from None
    return _collect(obj, storages, source)


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Read a ``torch.save``d state dict (legacy or zip format) without torch.

  Returns ``{name: np.ndarray}`` with C-contiguous, native-byte-order copies
  (bfloat16 tensors come back as ``ml_dtypes.bfloat16``). Raises
  :class:`TorchPickleError` (a :class:`pickle.UnpicklingError`), naming the file,
  for a forbidden pickle global, a truncated or non-PyTorch file, or entries that
  are not tensors.
  """
  path = os.fspath(path)
  source = repr(path)
  with open(path, "rb") as fh:
    head = fh.read(4)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
      fh.close()
      return _load_zip(path, source)
    if not head:
      raise TorchPickleError(f"{source}: empty file, not a PyTorch state dict")
    if head[0] != 0x80:
      raise TorchPickleError(
          f"{source}: not a PyTorch state dict (neither a zip archive nor "
          "a legacy pickle stream)"
      )
    fh.seek(0)
    buf = io.BytesIO(fh.read())
  try:
    return _load_legacy(buf, source)
  except TorchPickleError:
    raise
  except (
      EOFError,
      pickle.UnpicklingError,
      ValueError,
      TypeError,
      struct.error,
      IndexError,
      KeyError,
      AttributeError,
      MemoryError,
  ) as e:
    raise TorchPickleError(
        f"{source}: not a readable PyTorch legacy file, or truncated ({type(e).__name__}: {e})"
    ) from None
