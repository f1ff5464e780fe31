"""Datasets by name: `data.name` with an empty `data.root` reads <data_dir>/<name>/.

`ensure(spec)` (a `FetchSpec`, built from the config by runs/specs.py) returns the root of a named dataset, ready for the MVTec reader:
1. already prepared (`prepared.json` there) or put there by hand (the class folders directly
   in <data_dir>/<name>/): used as it is, never fetched again;
2. else its archive (`data.download_url`, or the registry's public address) is fetched into
   <data_dir>/<name>/downloads/ (resumable, SHA-256 checked: `base.download`), extracted
   safely into raw/ (`base.archive`), and converted where its layout differs (VisA, with its
   split CSV, into mvtec/); the archive is then deleted and `prepared.json` records the
   address, the SHA-256 seen and the root;
3. a dataset without a public address (a licence page, a cloud-drive link) is an error
   (exit 2) saying where to get it and where to put it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import urllib.parse

from cras_jax.base import archive, download, registry
from cras_jax.data import layout, visa

MARKER = "prepared.json"
SEARCH_DEPTH = 3  # how deep in an extracted archive the class folders may sit


class DatasetFetchError(download.FetchError):
  pass


@dataclasses.dataclass(frozen=True)
class FetchSpec:
  """A dataset named rather than given: its registry name, the classes asked for (empty: the
  registry's), where named datasets live (`data.data_dir` or <user cache>/datasets), and an
  archive address and SHA-256 that override the registry's (empty: the registry's)."""

  name: str
  classes: tuple[str, ...] = ()
  data_dir: str = ""
  download_url: str = ""
  download_sha256: str = ""


def folder(spec: FetchSpec) -> str:
  """<data_dir>/<registry name> of the dataset."""
  return os.path.join(spec.data_dir, registry.dataset(spec.name).name)


def _has_classes(d: str, classes: list[str]) -> bool:
  return bool(classes) and all(
      os.path.isdir(os.path.join(d, c, "train")) or os.path.isdir(os.path.join(d, c, "test"))
      for c in classes
  )


def _find(top: str, test) -> str | None:
  """The shallowest folder under `top` (itself included, SEARCH_DEPTH levels) passing `test`."""
  level = [top]
  for _ in range(SEARCH_DEPTH + 1):
    for d in level:
      if test(d):
        return d
    level = [
        os.path.join(d, e)
        for d in level
        for e in sorted(os.listdir(d))
        if os.path.isdir(os.path.join(d, e)) and not os.path.islink(os.path.join(d, e))
    ]
  return None


def _prepared(base: str, classes: list[str]) -> str | None:
  """The prepared root named by `prepared.json`, or `base` itself when it holds the classes,
  or None (prepare it). An unreadable record (half-written, not an object) is prepared
  again, saying so; a record whose root leaves `base` is refused."""
  marker = os.path.join(base, MARKER)
  if os.path.isfile(marker):
    try:
      with open(marker) as f:
        rel = json.load(f)["root"]
      if not isinstance(rel, str):
        raise TypeError(f"root is a {type(rel).__name__}")
    except (OSError, ValueError, KeyError, TypeError) as e:
      print(
          f"{marker} is unreadable ({type(e).__name__}: {e}); the dataset is prepared again",
          flush=True,
      )
    else:
      root = os.path.realpath(os.path.join(base, rel))
      if os.path.commonpath([root, os.path.realpath(base)]) != os.path.realpath(base):
        raise DatasetFetchError(
            f"{marker}: its root {rel!r} lies outside {base}; a prepared dataset stays in "
            f"its folder. Delete {marker} to prepare the dataset again"
        )
      if os.path.isdir(root):
        return root
  return base if _has_classes(base, classes) else None


def _archive_name(url: str) -> str:
  name = os.path.basename(urllib.parse.urlparse(url).path) or "archive"
  return name if layout.plain_name_problem(name) is None else "archive"


def _manual_message(spec: registry.DatasetSpec, base: str, classes: list[str]) -> str:
  where = f" from {spec.url}" if spec.url else ""
  return (
      f"data.root is empty and dataset {spec.name!r} cannot be fetched automatically: "
      f"{spec.how_to_get or 'no public address is recorded'}. Get it{where}, then either "
      f"extract it so that its class folders ({', '.join(classes[:4])}"
      f"{', ...' if len(classes) > 4 else ''}) are in {base}/, or set "
      f"--config.data.root=<its folder>, or set --config.data.download_url=<address or "
      f"file:///path of the archive you downloaded> to have it fetched and prepared here"
  )


def ensure(fspec: FetchSpec) -> str:
  """The prepared root of the named dataset (module docstring)."""
  spec = registry.dataset(fspec.name)
  base = folder(fspec)
  classes = registry.resolve_classes(spec.name, fspec.classes) or list(spec.classes)
  root = _prepared(base, classes)
  if root is not None:
    return root
  url = fspec.download_url or spec.archive_url
  if not url:
    raise DatasetFetchError(_manual_message(spec, base, classes))
  with download.file_lock(base + ".lock"):
    root = _prepared(base, classes)  # another process prepared it while this one waited
    if root is None:
      root = _fetch_and_prepare(fspec, spec, base, url, classes)
  return root


def _fetch_and_prepare(fspec: FetchSpec, spec, base: str, url: str, classes: list[str]) -> str:
  dest = os.path.join(base, "downloads", _archive_name(url))
  sha = fspec.download_sha256 or spec.archive_sha256
  hint = (
      f"To provide it by hand: download {url} and put it at {dest}, or extract it so that its "
      f"class folders are in {base}/, or set --config.data.root=<its folder>"
  )
  path, seen = download.fetch(url, dest, f"dataset {spec.name}", sha256=sha, hint=hint)
  if seen is None:  # an archive put there by hand: checked here
    seen = download.sha256_file(path)
    if sha and seen != sha.lower():
      raise DatasetFetchError(
          f"{path} has SHA-256 {seen}, expected {sha}: not the archive of {spec.name}; "
          f"delete it and try again"
      )
  raw = os.path.join(base, "raw")
  shutil.rmtree(raw, ignore_errors=True)  # a half-prepared earlier try
  print(f"extracting {os.path.basename(path)} into {raw}", flush=True)
  try:
    archive.extract(path, raw)
  except archive.DamagedArchiveError as e:
    # Never kept under its final name: the next run would take it as fetched.
    aside = f"{path}.damaged-{int(time.time())}"
    os.replace(path, aside)
    raise DatasetFetchError(
        f"{e}. The archive is damaged (a transfer that ended short, or a corrupt copy): it "
        f"was moved to {aside}, and the next run fetches it again"
    ) from None
  if spec.layout == "visa":
    src = _find(raw, lambda d: os.path.isfile(os.path.join(d, visa.SPLIT_CSV)))
    if src is None:
      raise DatasetFetchError(f"{url}: the archive has no {visa.SPLIT_CSV} (not VisA's release?)")
    root = os.path.join(base, "mvtec")
    print(f"converting VisA to the MVTec layout in {root}", flush=True)
    visa.convert(src, root, list(fspec.classes) or None)
  else:
    root = _find(raw, lambda d: _has_classes(d, classes))
    if root is None:
      raise DatasetFetchError(
          f"{url}: the archive has no folder holding the classes {', '.join(classes)} "
          f"(each with train/ or test/) within {SEARCH_DEPTH} levels; extracted into {raw}"
      )
  record = {
      "name": spec.name,
      "url": url,
      "archive": os.path.basename(path),
      "sha256": seen,
      "sha256_pinned": bool(sha),
      "root": os.path.relpath(root, base),
  }
  tmp = os.path.join(base, MARKER + ".tmp")
  with open(tmp, "w") as f:
    json.dump(record, f, indent=2)
  os.replace(tmp, os.path.join(base, MARKER))
  shutil.rmtree(os.path.dirname(path), ignore_errors=True)  # the archive and its lock
  if seen and not sha:
    print(
        f"dataset {spec.name}: archive SHA-256 {seen} (no pinned hash to compare; recorded in "
        f"{os.path.join(base, MARKER)})",
        flush=True,
    )
  return root
