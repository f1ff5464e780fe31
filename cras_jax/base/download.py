"""Fetching one file over HTTP(S): resumable, verified, atomic, with a progress bar.

`fetch(url, dest, ...)` downloads into `<dest>.part`, resuming an interrupted transfer with an
HTTP Range request, checks the bytes against a pinned SHA-256 and/or a SHA-256 prefix (the
torch.hub rule for names like `resnet18-f37072fd.pth`), and only then renames the file to
`dest`: a file under its final name is complete and verified, and is never fetched again.
A checksum mismatch deletes what was downloaded; a network failure keeps the partial file for
the next try and raises a `FetchError` (exit 2) saying what was tried, from where, and where to
put the file by hand.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import os
import urllib.error
import urllib.request

from cras_jax.base import errors, progress

CHUNK = 1 << 20
TIMEOUT_S = 60.0
USER_AGENT = "cras_jax-fetch/1"


class FetchError(errors.UserError):
  """A file could not be fetched or failed its checksum; the message says what to do."""


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(chunk), b""):
      h.update(block)
  return h.hexdigest()


@contextlib.contextmanager
def file_lock(path: str):
  """An exclusive lock on `path` (created): processes fetching the same file take turns."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def by_hand(what: str, url: str, dest: str) -> str:
  return f"To provide {what} by hand: download {url} on a connected machine and put it at {dest}"


def _open(url: str, start: int):
  headers = {"User-Agent": USER_AGENT}
  if start:
    headers["Range"] = f"bytes={start}-"
  return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)


def _total(resp, start: int) -> int | None:
  if resp.status == 206:  # Content-Range: bytes a-b/total
    total = resp.headers.get("Content-Range", "").rpartition("/")[2]
    return int(total) if total.isdigit() else None
  length = resp.headers.get("Content-Length")
  return int(length) if length and length.isdigit() else None


def _transfer(url: str, part: str, what: str) -> None:
  """Downloads `url` into `part`, continuing from its current size."""
  start = os.path.getsize(part) if os.path.exists(part) else 0
  try:
    resp = _open(url, start)
  except urllib.error.HTTPError as e:
    if e.code == 416 and start:  # nothing left to send: the part file is complete
      return
    raise
  with resp:
    if start and resp.status != 206:  # the server ignored the Range: start again
      start = 0
    total = _total(resp, start)
    with (
        open(part, "ab" if start else "wb") as f,
        progress.bar(
            total, f"fetching {what}", initial=start, unit="B", unit_scale=True, unit_divisor=1024
        ) as bar,
    ):
      while True:
        block = resp.read(CHUNK)
        if not block:
          break
        f.write(block)
        bar.update(len(block))
  got = os.path.getsize(part)
  if total is not None and got < total:
    raise http.client.IncompleteRead(b"", total - got)


def _verify(path: str, sha256: str | None, prefix: str, what: str, url: str) -> str:
  seen = sha256_file(path)
  want = (sha256 or "").lower()
  if (want and seen != want) or (prefix and not seen.startswith(prefix.lower())):
    os.remove(path)
    expected = want or f"{prefix}... (the prefix its name carries)"
    raise FetchError(
        f"{what} fetched from {url} has SHA-256 {seen}, expected {expected}; the file was "
        f"deleted (nothing kept). The download was damaged or the address serves another "
        f"file: try again, or check the address"
    )
  return seen


def fetch(
    url: str,
    dest: str,
    what: str,
    sha256: str | None = None,
    sha256_prefix: str = "",
    hint: str = "",
) -> tuple[str, str | None]:
  """`dest`, downloaded from `url` unless it is already there -> (dest, SHA-256 seen, or None
  when the file was already there). `what` names the file in messages; `hint` adds how to
  provide it by hand (default: `by_hand`)."""
  if os.path.isfile(dest):
    return dest, None
  os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
  part = dest + ".part"
  with file_lock(dest + ".lock"):
    if os.path.isfile(dest):  # another process fetched it while this one waited
      return dest, None
    try:
      _transfer(url, part, what)
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
      reason = getattr(e, "reason", None) or e
      kept = os.path.getsize(part) if os.path.exists(part) else 0
      raise FetchError(
          f"could not fetch {what} from {url} ({type(e).__name__}: {reason})"
          + (f"; {kept} bytes kept in {part}, the next try resumes" if kept else "")
          + f". {hint or by_hand(what, url, dest)}"
      ) from None
    seen = _verify(part, sha256, sha256_prefix, what, url)
    os.replace(part, dest)
  return dest, seen
