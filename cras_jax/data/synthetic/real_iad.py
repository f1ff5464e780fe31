"""The synthetic demo drawn into Real-IAD's release layout, small (the tests' Real-IAD data).

Layout written under ``root`` (``data/real_iad.py`` reads it as it reads the release)::

    <root>/realiad_<size>/<cls>/OK/S0001/<cls>_0001_OK_C1_<time>.jpg        5 views a sample
    <root>/realiad_<size>/<cls>/NG/<type>/S0004/<cls>_0004_NG_<type>_C1_<time>.jpg
    <root>/realiad_<size>/<cls>/NG/<type>/S0004/<cls>_0004_NG_<type>_C1_<time>.png  (0/255)
    <root>/realiad_jsons/realiad_jsons/<cls>.json      every view of every sample
    <root>/realiad_jsons/realiad_jsons_sv/<cls>.json   view C1 only
    <root>/synthetic_realiad_manifest.json

Each sample is one drawing (``images.render``: chip, fabric, gear or granite by class, with a
per-class colour permutation) seen from 5 "views" (rotated and mirrored copies). A defective
sample's last view (C5) does not show its defect: it is drawn normal, kept in the sample's NG
folder without a mask and listed ``"anomaly_class": "OK"``, as the release lists such views.
Defect types carry the release's codes (AK, BX, CH, HS, PS, QS, YW, ZW). The test split's
entries are written in a shuffled order, so that a reader pairing masks by order would fail.
Written like ``writing.generate``: into a temporary sibling, renamed into place, reused when
the manifest matches.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from cras_jax.base import registry
from cras_jax.data.synthetic import images, writing

MANIFEST_NAME = "synthetic_realiad_manifest.json"
VERSION = 1
VIEWS = 5
RENDERERS = ("chip", "fabric", "gear", "granite")
DEFECT_CODES = ("AK", "BX", "CH", "HS", "PS", "QS", "YW", "ZW")  # the release's type codes
_PERMS = tuple(itertools.permutations(range(3)))


def _view(arr: np.ndarray, v: int) -> np.ndarray:
  """View ``v`` (0..4) of a drawing: rotations, the last one mirrored."""
  out = np.rot90(arr, v % 4)
  return np.ascontiguousarray(out[:, ::-1] if v == 4 else out)


def _draw(k: int, seed: int, split: str, index: int, defect, size: int):
  renderer = RENDERERS[k % len(RENDERERS)]
  kind = None if defect is None else images.DEFECT_TYPES[renderer][defect % 3]
  img, mask = images.render(renderer, seed + k, split, index, kind, size)
  img = np.ascontiguousarray(img[..., list(_PERMS[(k // len(RENDERERS)) % len(_PERMS)])])
  if k >= len(RENDERERS) * len(_PERMS):
    img = 255 - img
  return img, mask


def _write_tree(out: str, manifest: dict) -> None:
  p = manifest["params"]
  seed, size = p["seed"], p["image_size"]
  rng = np.random.default_rng(seed)
  for k, cls in enumerate(manifest["classes"]):
    base = os.path.join(out, f"realiad_{size}", cls)
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    plan = (
        [("train", None)] * p["n_train"]
        + [("test", None)] * p["n_test_good"]
        + [("test", i) for i in range(p["n_test_bad"])]
    )
    for s, (split, defect) in enumerate(plan, start=1):
      sid = f"{s:04d}"
      code = None if defect is None else DEFECT_CODES[(k + defect) % len(DEFECT_CODES)]
      folder = f"OK/S{sid}" if code is None else f"NG/{code}/S{sid}"
      os.makedirs(os.path.join(base, folder), exist_ok=True)
      img, mask = _draw(k, seed, "train" if split == "train" else "test", s, defect, size)
      hidden = None if code is None else _draw(k, seed, "test", 10_000 + s, None, size)[0]
      for v in range(VIEWS):
        label = "OK" if code is None else f"NG_{code}"
        stem = f"{cls}_{sid}_{label}_C{v + 1}_2023101{v}{s:06d}"
        visible = code is not None and v < VIEWS - 1
        pixels = _view(img if code is None or visible else hidden, v)
        Image.fromarray(pixels).save(os.path.join(base, folder, stem + ".jpg"), quality=95)
        entry = {
            "category": cls,
            "anomaly_class": code if visible else "OK",
            "image_path": f"{folder}/{stem}.jpg",
            "mask_path": None,
        }
        if visible:
          m = _view(mask.astype(np.uint8) * 255, v)
          writing._save_png(os.path.join(base, folder, stem + ".png"), m)
          entry["mask_path"] = f"{folder}/{stem}.png"
        splits[split].append(entry)
    order = rng.permutation(len(splits["test"]))
    splits["test"] = [splits["test"][i] for i in order]
    for split_set, keep in (("realiad_jsons", None), ("realiad_jsons_sv", "_C1_")):
      doc = {
          "meta": {"prefix": cls, "normal_class": "OK"},
          **{
              s: [e for e in entries if keep is None or keep in e["image_path"]]
              for s, entries in splits.items()
          },
      }
      jdir = os.path.join(out, "realiad_jsons", split_set)
      os.makedirs(jdir, exist_ok=True)
      with open(os.path.join(jdir, f"{cls}.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
  writing.write_manifest(out, manifest, MANIFEST_NAME)  # last: marks a complete tree


def _read_manifest(root: str) -> dict | None:
  return writing.read_manifest(root, MANIFEST_NAME)


def generate(
    root: str | os.PathLike,
    classes: Sequence[str] = registry.REAL_IAD_CLASSES,
    seed: int = 0,
    image_size: int = 32,
    n_train: int = 2,
    n_test_good: int = 1,
    n_test_bad: int = 1,
) -> list[str]:
  """Write (or reuse) the synthetic Real-IAD tree under ``root``; returns its classes. Each
  sample gives 5 images (its views). An existing ``root`` with the same manifest is reused;
  one made by this generator with other parameters is replaced; a non-empty folder without
  the manifest is never touched (``FileExistsError``)."""
  classes = list(classes)
  if not classes or len(set(classes)) != len(classes):
    raise ValueError(f"classes must be distinct names, got {classes}")
  counts = {"n_train": n_train, "n_test_good": n_test_good, "n_test_bad": n_test_bad}
  if min(counts.values()) < 1 or image_size < 16:
    raise ValueError(f"counts must be >= 1 and image_size >= 16, got {counts}, {image_size}")
  manifest = {
      "generator": "cras_jax.data.synthetic.real_iad",
      "version": VERSION,
      "renderer_version": writing.GENERATOR_VERSION,
      "classes": classes,
      "params": {"seed": int(seed), "image_size": int(image_size), **counts},
  }
  root = os.path.abspath(os.fspath(root))
  if _read_manifest(root) == manifest:
    return classes
  writing.write_in_place(
      root,
      MANIFEST_NAME,
      lambda out: _write_tree(out, manifest),
      lambda: _read_manifest(root) == manifest,
  )
  return classes
