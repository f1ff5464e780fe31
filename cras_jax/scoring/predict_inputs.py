"""The inputs of `cras_jax.predict`: finding image files, naming their outputs, reading them.

Folders are searched recursively (sorted, hidden entries skipped) for the dataset loader's
image extensions; each file gets a name relative to the common parent of all inputs and a
unique output stem (only regular files are read: a FIFO or device named `*.png` is skipped
in folders and reported when named); files are decoded and preprocessed by `preprocess.load_example` in
threads, a window ahead, each unreadable or oversized one reported by name. Oversized: the
rule of `deploy.image_limits.problem`, the one `run_onnx` applies to the same files.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import itertools
import os
from collections.abc import Iterator, Sequence

import numpy as np

from cras_jax.base import fs, image_limits
from cras_jax.data import layout, preprocess


@dataclasses.dataclass(frozen=True)
class Limits(preprocess.Limits):
  """`preprocess.Limits` refusing by `image_limits.problem`: predict and run_onnx refuse the
  same files."""

  def problem(self, width: int, height: int) -> str | None:
    return image_limits.problem(width, height, self.max_pixels, self.max_aspect_ratio)


def shared_limits(limits: preprocess.Limits | None) -> Limits:
  """`limits` (default: the schema's) under the rule run_onnx applies."""
  limits = preprocess.Limits() if limits is None else limits
  return Limits(limits.max_pixels, limits.max_aspect_ratio)


def find_images(inputs: Sequence[str]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
  """-> ([(path, name)], [(path, error)]). Folders are searched recursively (sorted, hidden
  entries skipped); `name` is the path relative to the common parent of all inputs (a folder
  argument keeps its own name), so names are unique and, for a dataset's class folders, equal
  the evaluation's names. Paths that do not exist are returned as errors."""
  files, missing = [], []
  for p in inputs:
    if os.path.isdir(p):
      found = []
      for dirpath, dirnames, filenames in os.walk(p):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [
            os.path.join(dirpath, f)
            for f in sorted(filenames)
            if not f.startswith(".")
            and f.lower().endswith(layout.IMAGE_EXTENSIONS)
            and fs.is_regular_file(os.path.join(dirpath, f))  # a FIFO would block the reader
        ]
      files += [(f, os.path.dirname(os.path.abspath(os.path.normpath(p)))) for f in found]
    elif fs.is_regular_file(p):
      files.append((p, os.path.dirname(os.path.abspath(p))))
    elif os.path.exists(p):
      missing.append((p, f"not a regular file (a FIFO, socket or device is never read): {p}"))
    else:
      missing.append((p, f"file not found: {p}"))
  if not files:
    return [], missing
  base = os.path.commonpath([b for _, b in files])
  out, seen = [], set()
  for f, _ in files:
    a = os.path.abspath(f)
    if a in seen:
      continue
    seen.add(a)
    out.append((f, os.path.relpath(a, base).replace(os.sep, "/")))
  return out, missing


def output_stems(names: Sequence[str]) -> list[str]:
  """Unique file-name stems for the per-image outputs: the name with '/' -> '__', without
  extension; where two names would give the same stem (also ignoring case: 'sub/b.png' and
  'sub__b.png', 'a.png' and 'A.jpg'), each gets '~' and a hash of its full name, so no output
  overwrites another."""
  plain = [os.path.splitext(n)[0].replace("/", "__") for n in names]
  count = collections.Counter(p.lower() for p in plain)
  out, used = [], set()
  for p, n in zip(plain, names):
    stem = p if count[p.lower()] == 1 else f"{p}~{hashlib.sha256(n.encode()).hexdigest()[:10]}"
    k = 1
    while stem.lower() in used:  # a hash equal to another stem: practically never
      stem, k = f"{stem}~{k}", k + 1
    used.add(stem.lower())
    out.append(stem)
  return out


def read_images(
    paths: Sequence[str],
    resize: int,
    crop: int,
    workers: int,
    limits: preprocess.Limits | None = None,
) -> Iterator[tuple[int, np.ndarray | None, str | None]]:
  """(index, preprocessed uint8 crop or None, error or None) in input order; decoding runs in
  `workers` threads, a window ahead. A file over `limits` (pixels, aspect ratio) is an error
  named by its path, not decoded (`image_limits.problem`, as run_onnx refuses it)."""
  limits = shared_limits(limits)

  def work(p):
    try:
      return preprocess.load_example(p, None, resize, crop, limits=limits)[0], None
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported by name
      msg = str(e) or type(e).__name__
      return None, msg if os.fspath(p) in msg else f"{p}: {msg}"

  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    pending = collections.deque()
    todo = iter(enumerate(paths))
    for i, p in itertools.islice(todo, 4 * workers):
      pending.append((i, pool.submit(work, p)))
    while pending:
      i, fut = pending.popleft()
      nxt = next(todo, None)
      if nxt is not None:
        pending.append((nxt[0], pool.submit(work, nxt[1])))
      image, err = fut.result()
      yield i, image, err
