"""File-system checks that turn a machine's limits into user errors naming the fix.

`writable_dir` creates a directory a command writes into and probes that it can write there
(a path that is a file, a read-only directory or one without permission is a `UserError`);
`reserve` checks free space (`shutil.disk_usage`) and preallocates a file before it is
memory-mapped, so a full disk is refused up front instead of killing the process with SIGBUS
when a mapped page cannot be backed; `is_regular_file` is the test every reader of
user-named inputs applies (a FIFO or device named `*.png` would block or never end).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile

from cras_jax.base import errors

# Left free on a disk after a reservation (other writers, the file system's own needs).
DISK_MARGIN_BYTES = 64 * 2**20


def _package_checkout() -> str | None:
  """The checkout cras_jax runs from (the folder holding `cras_jax/` and `.git`), if any."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  return root if os.path.isdir(os.path.join(root, ".git")) else None


def shared_place(path: str) -> str | None:
  """Why no command should own `path` as its folder (create, fill, prune it), or None: the
  filesystem root (what `--workdir=$UNSET/` gives), a home directory itself, or the checkout
  cras_jax runs from."""
  real = os.path.realpath(os.path.abspath(os.path.expanduser(path)))
  if real == os.path.dirname(real):
    return "the filesystem root"
  homes = {os.path.realpath(os.path.expanduser("~"))}
  if os.environ.get("HOME"):
    homes.add(os.path.realpath(os.environ["HOME"]))
  if real in homes:
    return "a home directory itself"
  checkout = _package_checkout()
  if checkout and real == os.path.realpath(checkout):
    return "the root of cras_jax's own checkout"
  return None


def refuse_shared_place(path: str, what: str) -> None:
  """A `UserError` naming `what` when `path` is a place no run should own (`shared_place`)."""
  why = shared_place(path)
  if why:
    raise errors.UserValueError(
        f"{what} {path!r} is {why}: a command would write and prune its files there; give a "
        "folder of its own (e.g. runs/<name>)"
    )


def writable_dir(path: str, what: str, fix: str = "") -> str:
  """Creates `path` (and parents) and checks that a file can be written there -> `path`.
  `what` names the directory in the message (e.g. "--workdir"), `fix` says what to do. The
  filesystem root, a home directory and cras_jax's checkout are refused (`shared_place`)."""
  hint = f"; {fix}" if fix else ""
  refuse_shared_place(path, what)
  if os.path.exists(path) and not os.path.isdir(path):
    raise errors.UserValueError(f"{what} {path!r} is a file, not a directory{hint}")
  try:
    os.makedirs(path, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=path)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise errors.UserValueError(
        f"{what} {path!r} cannot be written ({e.strerror or e}){hint}"
    ) from None
  return path


def mib(n: float) -> str:
  return f"{n / 2**20:.1f} MiB"


def check_free_space(folder: str, need: int, what: str, fix: str) -> None:
  """Raises a `UserError` when `folder`'s disk has less than `need` bytes (+ a margin) free."""
  free = shutil.disk_usage(folder).free
  if free < need + DISK_MARGIN_BYTES:
    raise errors.UserValueError(
        f"{what} needs {mib(need)} in {folder!r}, where only {mib(free)} are free "
        f"(and {mib(DISK_MARGIN_BYTES)} are kept free); {fix}"
    )


def reserve(path: str, size: int, what: str, fix: str) -> None:
  """Allocates the blocks of the existing file `path` up to `size` bytes (so writes through a
  memory map cannot fail for space); a full disk raises a `UserError`. File systems without
  preallocation rely on `check_free_space` alone."""
  fd = os.open(path, os.O_RDWR)
  try:
    os.posix_fallocate(fd, 0, size)
  except OSError as e:
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
      raise errors.UserValueError(
          f"{what}: the disk of {path!r} has no room for {mib(size)} ({e.strerror}); {fix}"
      ) from None
    if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
      raise
  finally:
    os.close(fd)


def is_regular_file(path: str) -> bool:
  """True for a regular file (after symlinks); False for FIFOs, sockets, devices, folders."""
  try:
    return stat.S_ISREG(os.stat(path).st_mode)
  except OSError:
    return False
