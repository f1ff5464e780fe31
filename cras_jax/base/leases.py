"""Reader leases on shared files and folders, so that pruning never removes what a live process
reads.

A process that reads a prepared dataset or a feature-cache file holds a lease on it for its
lifetime (`hold`): a file `<parent>/.leases/<name>@<host>.<pid>.<random>` on which it keeps a
shared `flock`. The kernel drops the lock when the process ends in any way (even `kill -9`),
so a lease is live exactly while its lock is held (`in_use`); the files of dead holders are
stale, ignored and removed. On a file system without `flock`, a lease of this host is live
while its process id runs and one of another host is always taken as live (never pruned).
Pruners decide and delete under an exclusive lock that readers also take to start their lease
(`exclusive`), so a reader cannot appear between the check and the removal.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import json
import os
import socket
import uuid

LEASE_DIR = ".leases"
_HOST = socket.gethostname().replace("@", "_").replace(os.sep, "_")
_HELD: dict[str, tuple[int, str]] = {}  # target -> (fd, lease path), this process


def _lease_dir(target: str) -> str:
  return os.path.join(os.path.dirname(os.path.abspath(target)), LEASE_DIR)


def _prefix(target: str) -> str:
  return os.path.basename(os.path.abspath(target).rstrip(os.sep)) + "@"


def hold(target: str) -> str:
  """Takes (once per process) a lease on `target` (a file or folder, existing or not) that
  lasts until the process ends or `release(target)` -> the lease file."""
  target = os.path.abspath(target)
  if target in _HELD:
    return _HELD[target][1]
  folder = _lease_dir(target)
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, f"{_prefix(target)}{_HOST}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
  fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
  with contextlib.suppress(OSError):  # no flock here: the process id decides (module doc)
    fcntl.flock(fd, fcntl.LOCK_SH)
  os.write(fd, json.dumps({"target": target, "host": _HOST, "pid": os.getpid()}).encode())
  _HELD[target] = (fd, path)
  return path


def release(target: str) -> None:
  """Ends this process's lease on `target` (if any)."""
  fd, path = _HELD.pop(os.path.abspath(target), (None, None))
  if fd is None:
    return
  with contextlib.suppress(OSError):
    os.remove(path)
  os.close(fd)


@atexit.register
def _release_all() -> None:
  for target in list(_HELD):
    release(target)


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except (PermissionError, OverflowError):
    return True
  return True


def _live(path: str, name: str) -> bool:
  """Whether the lease file `path` belongs to a live process; a stale one is removed."""
  try:
    fd = os.open(path, os.O_RDONLY)
  except FileNotFoundError:
    return False
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    return True  # a holder keeps its shared lock
  except OSError as e:
    if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
      raise
    head, pid, _ = (name.rsplit(".", 2) + ["", ""])[:3]  # <target>@<host>.<pid>.<random>
    host = head.rpartition("@")[2]
    if host != _HOST or not pid.isdigit() or _pid_alive(int(pid)):
      return True
  finally:
    os.close(fd)
  with contextlib.suppress(OSError):
    os.remove(path)  # stale: its holder has ended
  return False


def holders(target: str) -> list[str]:
  """The live lease files of other processes on `target` (stale ones are removed on the
  way; this process's own lease is not counted: what it replaced itself it no longer
  reads)."""
  folder, prefix = _lease_dir(target), _prefix(target)
  if not os.path.isdir(folder):
    return []
  own = {p for _, p in _HELD.values()}
  return [
      os.path.join(folder, n)
      for n in sorted(os.listdir(folder))
      if n.startswith(prefix)
      and os.path.join(folder, n) not in own
      and _live(os.path.join(folder, n), n)
  ]


def in_use(target: str) -> bool:
  """True while another live process holds a lease on `target`."""
  return bool(holders(target))


@contextlib.contextmanager
def exclusive(folder: str, name: str = ".prune.lock"):
  """An exclusive lock on `folder`/`name` for deciding and pruning (module docstring)."""
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, name), "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
