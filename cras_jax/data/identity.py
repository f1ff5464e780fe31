"""What a dataset is, by content: the SHA-256 of every image and mask file's bytes.

`file_digests` hashes the files (in a thread pool: hashlib releases the GIL), `fingerprint`
combines them with each file's place in the layout (class, split, defect type, path relative to
the root) into the name of the prepared cache, so an image edited in place gets a new prepared
copy whatever its size and mtime say. `of_records` is the identity a run records in its
checkpoints: the class list and, per split and class, the number of images and a hash of their
contents (`differences` names what changed between two). A copy of the same files under
another root has the same identity.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from cras_jax.data import layout

_CHUNK = 1 << 20


def file_digest(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
  return h.hexdigest()


def file_digests(paths: Iterable[str], num_workers: int | None = None) -> dict[str, str]:
  """path -> SHA-256 (hex) of its bytes. A file that cannot be read maps to "unreadable: ..."
  (validation names it)."""
  paths = sorted(set(paths))
  workers = num_workers or min(32, max(1, os.cpu_count() or 1))

  def one(p):
    try:
      return file_digest(p)
    except OSError as e:
      return f"unreadable: {type(e).__name__}"

  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return dict(zip(paths, pool.map(one, paths)))


def record_paths(records: Iterable[layout.Record]) -> list[str]:
  return [p for r in records for p in (r.image_path, r.mask_path) if p]


def _relname(path: str, root: str) -> str:
  return Path(os.path.relpath(path, root)).as_posix()


def _lines(records: Iterable[layout.Record], root: str, digests: dict[str, str]):
  for r in records:
    mask = f"{_relname(r.mask_path, root)}:{digests[r.mask_path]}" if r.mask_path else "-"
    yield (
        f"{r.class_name}|{r.split}|{r.defect_type}|{_relname(r.image_path, root)}:"
        f"{digests[r.image_path]}|{mask}\n"
    )


def fingerprint(
    records: Sequence[layout.Record], root: str | os.PathLike, digests: dict[str, str]
) -> str:
  """SHA-256 (hex) over every record's place in the layout and its files' contents."""
  h = hashlib.sha256()
  for line in _lines(records, os.fspath(root), digests):
    h.update(line.encode())
  return h.hexdigest()


def of_records(
    records: Sequence[layout.Record],
    class_names: Sequence[str],
    root: str | os.PathLike,
    digests: dict[str, str],
) -> dict:
  """{"classes": [...], "train": {class: {"images": n, "sha256": hex}}, "test": {...}}."""
  root = os.fspath(root)
  out: dict = {"classes": list(class_names)}
  for split in ("train", "test"):
    per_class = {}
    for c in class_names:
      rs = sorted(
          (r for r in records if r.split == split and r.class_name == c),
          key=lambda r: _relname(r.image_path, root),
      )
      h = hashlib.sha256()
      for line in _lines(rs, root, digests):
        h.update(line.encode())
      per_class[c] = {"images": len(rs), "sha256": h.hexdigest()}
    out[split] = per_class
  return out


def differences(saved: dict | None, current: dict | None, split: str) -> list[str]:
  """What differs between two identities in `split` ("train" or "test"), one line per class
  (the class list first); [] when they agree or either is unknown (a run of a version that
  recorded none)."""
  if not saved or not current or split not in saved or split not in current:
    return []
  out = []
  if list(saved["classes"]) != list(current["classes"]):
    added = [c for c in current["classes"] if c not in saved["classes"]]
    gone = [c for c in saved["classes"] if c not in current["classes"]]
    out.append(
        f"class list: saved {list(saved['classes'])}, now {list(current['classes'])}"
        + (f" (added {added})" if added else "")
        + (f" (removed {gone})" if gone else "")
    )
  for c in current["classes"]:
    a, b = saved[split].get(c), current[split].get(c)
    if a is None or b is None or a == b:
      continue
    what = "images" if a["images"] != b["images"] else "contents"
    out.append(
        f"{split} images of class {c!r}: {a['images']} then, {b['images']} now"
        + (" (same count, other contents)" if what == "contents" else "")
    )
  return out
