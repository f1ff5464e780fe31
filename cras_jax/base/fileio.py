"""Whole files written atomically: complete or not there, never empty or truncated.

Every result file a run or a command writes as a whole (metrics, scores, thresholds, summaries,
exports, predictions) goes through `atomic_write`: the bytes go to a temporary file in the same
directory, are flushed and fsynced, and the temporary is renamed over the target (a rename is
atomic on POSIX filesystems); the directory is then fsynced so the rename itself survives a
power cut. A reader sees the old file or the new one; an interrupted or failed write (a full
disk, a signal, a crash) leaves the old file, or none, and no temporary behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from typing import IO, Any


def _fsync_dir(directory: str) -> None:
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:  # e.g. a platform without directory file descriptors
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def temporary_name(path: str | os.PathLike) -> str:
  """A fresh hidden name beside `path` (same directory, so the rename stays atomic)."""
  path = os.fspath(path)
  head, tail = os.path.split(os.path.abspath(path))
  return os.path.join(head, f".{tail}.{uuid.uuid4().hex[:12]}.tmp")


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike, mode: str = "w", *, newline: str | None = None
) -> Iterator[IO[Any]]:
  """Opens a temporary beside `path` for writing (`mode` "w" text, "wb" bytes); on a clean
  exit it is fsynced and renamed over `path`, on an exception removed. Parent directories
  are created. The file's permissions follow the umask, as `open` would give them."""
  if mode not in ("w", "wb"):
    raise ValueError(f"mode={mode!r}: 'w' or 'wb'")
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = temporary_name(path)
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    kwargs = {} if mode == "wb" else {"encoding": "utf-8", "newline": newline}
    with os.fdopen(fd, mode, **kwargs) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise
  _fsync_dir(directory)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  with atomic_write(path, "w") as f:
    f.write(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
  with atomic_write(path, "wb") as f:
    f.write(data)


def atomic_write_json(path: str | os.PathLike, obj: Any, **dump_kwargs) -> None:
  """`obj` as JSON (indent 2 unless given), written atomically."""
  dump_kwargs.setdefault("indent", 2)
  atomic_write_text(path, json.dumps(obj, **dump_kwargs) + "\n")


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
  """`src`'s bytes copied to `dst` atomically."""
  with open(src, "rb") as fin, atomic_write(dst, "wb") as fout:
    shutil.copyfileobj(fin, fout)


def read_json_object(path: str | os.PathLike, required: tuple[str, ...] = ()) -> dict | None:
  """The JSON object in `path` when it parses and holds every key of `required`; None when the
  file is missing, empty, truncated, not an object or lacks a key."""
  try:
    with open(path, encoding="utf-8") as f:
      obj = json.load(f)
  except (OSError, ValueError):
    return None
  if not isinstance(obj, dict) or any(k not in obj for k in required):
    return None
  return obj
