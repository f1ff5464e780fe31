"""One model across datasets (`data.name=combined`, `data.sources`): the classes of several
MVTec-layout datasets read as one dataset, each class named `<dataset>.<class>`.

`data.sources` lists the datasets, each `name` (a registered dataset read from its prepared
copy under `data.data_dir`, fetched there by name where it can be; `synthetic`: the demo's
generated set) or `name:root` (its folder, in the MVTec layout; `folder:<root>` for any
folder, its classes discovered). The prefix of a class is its source's name, so each name may
appear once. The classes are gathered as a folder of links, `<data cache>/combined/<hash of the
sources>/<dataset>.<class>` -> `<root>/<class>`, read by the same builder as every dataset: one
prepared copy, one content fingerprint over every file of every source. `data.classes`, when
given, picks prefixed names. MVTec AD 2 and Real-IAD have layouts of their own and are not
combined here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence

from cras_jax.base import errors, registry
from cras_jax.data import layout
from cras_jax.data.spec import DataSpec

NAME = "combined"
SEP = "."  # <dataset>.<class>
FIELD = "data.sources"


class SourcesError(errors.UserValueError):
  """`data.sources` names something that cannot be combined (the message names the entry):
  one message, exit status 2."""


def parse(sources: Sequence[str]) -> list[tuple[str, str]]:
  """`data.sources` -> [(name, root or "")], with every problem in one `SourcesError`."""
  problems, out = [], []
  if not isinstance(sources, (tuple, list)) or not sources:
    raise SourcesError(
        f"{FIELD}={sources!r}: list the datasets to combine, e.g. "
        f'\'("mvtec:/data/mvtec", "visa:/data/visa")\' (name or name:root each)'
    )
  for entry in sources:
    if not isinstance(entry, str) or not entry.strip():
      problems.append(f"{entry!r} is not 'name' or 'name:root'")
      continue
    name, _, root = entry.partition(":")
    name = registry.dataset(name).name if registry.dataset(name) is not None else name
    spec = registry.dataset(name)
    if name not in ("synthetic", "folder") and spec is None:
      problems.append(f"{entry!r}: no dataset named {name!r} (a registered name, or folder:<root>)")
    elif spec is not None and spec.layout in ("mvtec_ad2", "real_iad"):
      problems.append(f"{entry!r}: {name} has a layout of its own and is not combined")
    elif name == "folder" and not root:
      problems.append(f"{entry!r}: folder needs its root (folder:<root>)")
    elif layout.plain_name_problem(name):
      problems.append(f"{entry!r}: {layout.plain_name_problem(name)}")
    out.append((name, root))
  names = [n for n, _ in out]
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    problems.append(f"{', '.join(dup)} listed more than once (each prefixes its classes)")
  if problems:
    raise SourcesError(f"{FIELD}: " + "; ".join(problems))
  return out


def dataset_of(class_name: str) -> str:
  """The source of a combined class name (`mvtec.bottle` -> `mvtec`)."""
  return class_name.split(SEP, 1)[0]


def source_spec(spec: DataSpec, name: str, root: str) -> DataSpec:
  """The data spec of one source: its name and root, all its classes."""
  fetch = None if spec.fetch is None else dataclasses.replace(spec.fetch, name=name, classes=())
  return dataclasses.replace(spec, name=name, root=root, classes=(), fetch=fetch)


def link_tree(cache: str, parts: list[tuple[str, str, list[str]]]) -> str:
  """The folder of links `<dataset>.<class>` -> `<root>/<class>` for `parts` [(name, root,
  classes)], made (or remade) under `cache`; -> its path."""
  links = {
      f"{name}{SEP}{cls}": os.path.abspath(os.path.join(root, cls))
      for name, root, classes in parts
      for cls in classes
  }
  key = hashlib.sha256(json.dumps(sorted(links.items())).encode()).hexdigest()[:16]
  tree = os.path.join(cache, NAME, key)
  if os.path.isdir(tree) and all(
      os.path.islink(os.path.join(tree, k)) and os.readlink(os.path.join(tree, k)) == v
      for k, v in links.items()
  ):
    return tree
  os.makedirs(os.path.join(cache, NAME), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{key}-", dir=os.path.join(cache, NAME))
  for k, v in links.items():
    os.symlink(v, os.path.join(tmp, k))
  if os.path.isdir(tree):  # links changed by hand: replaced whole
    shutil.rmtree(tree)
  os.replace(tmp, tree)
  return tree


def resolve(spec: DataSpec, workdir: str, prepare_root, cache: str) -> tuple[str, list[str]]:
  """(root, classes) of the combined dataset of `spec` (its `sources`) in `cache` (the caller
  holds its lock), for `mvtec.load_dataset` to read: each source's root made ready
  (`prepare_root`: generated, fetched or given), its classes resolved (registered, or
  discovered), then the folder of links and the prefixed classes chosen."""
  parts = []
  for name, root in parse(spec.sources):
    sub = source_spec(spec, name, root)
    ready = prepare_root(sub, workdir)
    classes = registry.resolve_classes(name, ()) or layout.discover_classes(ready)
    if not classes:
      raise SourcesError(
          f"{FIELD}: {name}:{ready} holds no class folders (sub-folders with train/ or test/):"
          f" give the dataset's root"
      )
    parts.append((name, ready, list(classes)))
  every = [f"{name}{SEP}{c}" for name, _, classes in parts for c in classes]
  chosen = list(spec.classes) or every
  unknown = [c for c in chosen if c not in every]
  if unknown:
    raise SourcesError(
        f"data.classes: {', '.join(unknown)} not among the combined classes (<dataset>.<class>:"
        f" {', '.join(every[:8])}{', ...' if len(every) > 8 else ''})"
    )
  return link_tree(cache, parts), chosen
