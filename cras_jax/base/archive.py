"""Safe extraction of downloaded archives (tar, tar.gz/bz2/xz, zip).

Every member is checked before anything is written: its name must be relative, without `..`
parts, drive letters or backslashes; it must be a plain file or a folder (symlinks, hard links,
devices and FIFOs are refused); the number of members, each member's size and the total are
bounded. The files are then written by this module (not by `tarfile`/`zipfile`'s own
extraction), counting the bytes actually read, into a temporary folder beside the target that
is renamed to the target when complete: a refused or interrupted extraction leaves nothing.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import stat
import tarfile
import zipfile
from collections.abc import Iterator

from cras_jax.base import errors

COPY_CHUNK = 1 << 20


class ArchiveError(errors.UserError):
  """An archive that is refused (unsafe or oversized member) or unreadable."""


class DamagedArchiveError(ArchiveError):
  """An archive that cannot be read (truncated or corrupt), as opposed to one refused."""


@dataclasses.dataclass(frozen=True)
class Limits:
  max_members: int = 1_000_000
  max_member_bytes: int = 4 * 2**30
  max_total_bytes: int = 64 * 2**30


@dataclasses.dataclass(frozen=True)
class _Member:
  name: str
  is_dir: bool
  size: int
  handle: object  # TarInfo | ZipInfo


def _name_problem(name: str) -> str | None:
  if not name or "\x00" in name:
    return "an empty or NUL-carrying name"
  if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
    return "an absolute path"
  if "\\" in name:
    return "a backslash in its name"
  if any(part == ".." for part in name.split("/")):
    return "a '..' part (it would land outside the target)"
  return None


def _tar_members(tf: tarfile.TarFile) -> Iterator[_Member]:
  for m in tf:
    if m.issym() or m.islnk():
      yield _Member(m.name, False, -1, "link")
    elif not (m.isfile() or m.isdir()):
      yield _Member(m.name, False, -1, "special")
    else:
      yield _Member(m.name, m.isdir(), 0 if m.isdir() else m.size, m)


def _zip_members(zf: zipfile.ZipFile) -> Iterator[_Member]:
  for z in zf.infolist():
    kind = stat.S_IFMT(z.external_attr >> 16)  # 0: no Unix type recorded (a plain file)
    if kind == stat.S_IFLNK:
      yield _Member(z.filename, False, -1, "link")
    elif kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
      yield _Member(z.filename, False, -1, "special")
    else:
      yield _Member(z.filename, z.is_dir(), 0 if z.is_dir() else z.file_size, z)


def check_members(members, archive: str, limits: Limits) -> list[_Member]:
  """The archive's members, all checked (module docstring); raises `ArchiveError` naming the
  first refused one."""
  out, total = [], 0
  for m in members:
    why = _name_problem(m.name)
    if why is None and m.handle == "link":
      why = "a symbolic or hard link"
    if why is None and m.handle == "special":
      why = "not a plain file or folder (device, FIFO, ...)"
    if why is None and m.size > limits.max_member_bytes:
      why = f"{m.size} bytes, more than the limit of {limits.max_member_bytes}"
    if why is not None:
      raise ArchiveError(f"{archive}: member {m.name!r} is refused: {why}; nothing extracted")
    total += m.size
    if total > limits.max_total_bytes:
      raise ArchiveError(
          f"{archive}: members total more than {limits.max_total_bytes} bytes; nothing extracted"
      )
    if len(out) >= limits.max_members:
      raise ArchiveError(f"{archive}: more than {limits.max_members} members; nothing extracted")
    out.append(m)
  return out


def _copy(src, dst_path: str, limit: int, name: str, archive: str) -> int:
  n = 0
  with open(dst_path, "wb") as out:
    while block := src.read(COPY_CHUNK):
      n += len(block)
      if n > limit:  # the header lied about the size
        raise ArchiveError(f"{archive}: member {name!r} is larger than it says; refused")
      out.write(block)
  return n


def _is_zip(path: str) -> bool:
  return zipfile.is_zipfile(path)


def extract(archive: str, target: str, limits: Limits = Limits()) -> str:
  """Extracts `archive` into the folder `target` (which must not exist yet) -> `target`."""
  if os.path.exists(target):
    raise ArchiveError(f"{target} already exists; remove it to extract {archive} again")
  tmp = f"{target}.extracting-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    if _is_zip(archive):
      with zipfile.ZipFile(archive) as zf:
        members = check_members(_zip_members(zf), archive, limits)
        _write(members, tmp, zf.open, archive, limits)
    else:
      with tarfile.open(archive, "r:*") as tf:
        members = check_members(_tar_members(tf), archive, limits)
        _write(members, tmp, tf.extractfile, archive, limits)
  except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
    shutil.rmtree(tmp, ignore_errors=True)
    raise DamagedArchiveError(f"{archive}: unreadable archive ({type(e).__name__}: {e})") from None
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  os.replace(tmp, target)
  return target


def _write(members, tmp: str, open_member, archive: str, limits: Limits) -> None:
  os.makedirs(tmp)
  real_tmp = os.path.realpath(tmp)
  total = 0
  for m in members:
    path = os.path.realpath(os.path.join(tmp, m.name))
    if os.path.commonpath([path, real_tmp]) != real_tmp:  # belt and braces after the checks
      raise ArchiveError(f"{archive}: member {m.name!r} would land outside the target; refused")
    if m.is_dir:
      os.makedirs(path, exist_ok=True)
      continue
    os.makedirs(os.path.dirname(path), exist_ok=True)
    src = open_member(m.handle)
    if src is None:
      raise ArchiveError(f"{archive}: member {m.name!r} has no data")
    with src:
      total += _copy(src, path, min(m.size, limits.max_member_bytes), m.name, archive)
    if total > limits.max_total_bytes:
      raise ArchiveError(f"{archive}: members total more than {limits.max_total_bytes} bytes")
