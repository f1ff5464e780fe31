"""The prepared (TFDS) copy of a dataset, checked by content before it is reused.

When a preparation completes, the SHA-256 of every file of the prepared directory (the
array_record shards and TFDS's own JSON files) is written beside them (`DIGEST_FILE`); a later
load reuses the directory only if every file still has those bytes. A flipped byte, a shard
truncated, deleted or replaced, or a directory prepared before this record existed is
prepared again (the caller says so), never read as data or left to fail inside the reader.
"""

from __future__ import annotations

import json
import os

from cras_jax.base import download, fileio

DIGEST_FILE = "cras_jax_contents.json"


def _files(data_dir: str) -> list[str]:
  out = []
  for dirpath, _, names in os.walk(data_dir):
    for n in names:
      if n != DIGEST_FILE:
        out.append(os.path.relpath(os.path.join(dirpath, n), data_dir))
  return sorted(out)


def digests(data_dir: str) -> dict[str, str]:
  """{relative path: SHA-256} of every file of the prepared directory."""
  return {rel: download.sha256_file(os.path.join(data_dir, rel)) for rel in _files(data_dir)}


def record(data_dir: str) -> None:
  """Writes the digests of a directory just prepared (atomically)."""
  fileio.atomic_write_json(os.path.join(data_dir, DIGEST_FILE), {"sha256": digests(data_dir)})


def problem(data_dir: str) -> str | None:
  """Why the prepared directory cannot be reused as it is, or None."""
  try:
    with open(os.path.join(data_dir, DIGEST_FILE)) as f:
      stored = json.load(f)["sha256"]
    if not isinstance(stored, dict):
      raise TypeError("not a mapping")
    if not stored or not all(isinstance(v, str) and len(v) == 64 for v in stored.values()):
      return "its record of contents is empty or malformed (not verified)"
  except FileNotFoundError:
    return "it has no record of its contents (prepared by an older version)"
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"its record of contents is unreadable ({type(e).__name__})"
  now = _files(data_dir)
  if sorted(stored) != now:
    missing = sorted(set(stored) - set(now)) + sorted(set(now) - set(stored))
    return f"its files differ from those prepared ({', '.join(missing[:3])})"
  changed = [rel for rel in now if download.sha256_file(os.path.join(data_dir, rel)) != stored[rel]]
  if changed:
    return f"{len(changed)} file(s) changed since preparation ({', '.join(changed[:3])})"
  return None
