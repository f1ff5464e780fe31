"""Flax linen ResNet family mirroring torchvision exactly (inference only).

Supported architectures: ``resnet18``, ``resnet50``, ``wide_resnet50_2`` and
``wide_resnet101_2``.  The structure follows torchvision (v1.5 Bottleneck with
the stride on the 3x3 conv, explicit symmetric padding, max-pool padded with
-inf, BatchNorm eps 1e-5) and BatchNorm always runs in inference mode (frozen
backbone: running statistics from the ``batch_stats`` collection).

Inputs are NHWC float32, already normalised with the ImageNet mean/std.

Parameter naming mirrors torchvision's state-dict keys so that conversion is a
pure renaming + transpose::

    torch key                         flax variable
    conv1.weight           (O,I,H,W)  params/conv1/kernel          (H,W,I,O)
    bn1.weight / bn1.bias             params/bn1/scale, bias
    bn1.running_mean / running_var    batch_stats/bn1/mean, var
    layer1.0.conv1.weight             params/layer1_0/conv1/kernel
    layer2.0.downsample.0.weight      params/layer2_0/downsample_0/kernel
    layer2.0.downsample.1.*           params|batch_stats/layer2_0/downsample_1/*
    fc.weight (1000,C) / fc.bias      params/fc/kernel (C,1000), bias

``num_batches_tracked`` buffers are ignored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

__all__ = [
    "ARCH_CONFIGS",
    "LEVEL_CHANNELS",
    "LEVEL_STRIDES",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "from_torch_state_dict",
    "init_random",
    "flax_path_to_torch_key",
]

# arch -> (block type, blocks per stage, width_per_group)
ARCH_CONFIGS: dict[str, tuple[str, tuple[int, int, int, int], int]] = {
    "resnet18": ("basic", (2, 2, 2, 2), 64),
    "resnet50": ("bottleneck", (3, 4, 6, 3), 64),
    "wide_resnet50_2": ("bottleneck", (3, 4, 6, 3), 128),
    "wide_resnet101_2": ("bottleneck", (3, 4, 23, 3), 128),
}

_BASIC_CHANNELS = {1: 64, 2: 128, 3: 256, 4: 512}
_BOTTLENECK_CHANNELS = {1: 256, 2: 512, 3: 1024, 4: 2048}

LEVEL_CHANNELS: dict[str, dict[int, int]] = {
    arch: dict(_BASIC_CHANNELS if cfg[0] == "basic" else _BOTTLENECK_CHANNELS)
    for arch, cfg in ARCH_CONFIGS.items()
}

LEVEL_STRIDES: dict[int, int] = {1: 4, 2: 8, 3: 16, 4: 32}

NUM_CLASSES = 1000
_BN_EPS = 1e-5

# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu")
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # untruncated, as torch


def _check_arch(arch: str) -> tuple[str, tuple[int, int, int, int], int]:
  if arch not in ARCH_CONFIGS:
    raise ValueError(f"unknown ResNet arch {arch!r}; expected one of {sorted(ARCH_CONFIGS)}")
  return ARCH_CONFIGS[arch]


def _conv(features: int, kernel: int, stride: int, padding: int, name: str, dtype: Any) -> nn.Conv:
  return nn.Conv(
      features,
      kernel_size=(kernel, kernel),
      strides=(stride, stride),
      padding=((padding, padding), (padding, padding)),
      use_bias=False,
      kernel_init=_conv_init,
      dtype=dtype,
      param_dtype=jnp.float32,
      name=name,
  )


def _bn(name: str, dtype: Any) -> nn.BatchNorm:
  return nn.BatchNorm(
      use_running_average=True,
      momentum=0.9,
      epsilon=_BN_EPS,
      dtype=dtype,
      param_dtype=jnp.float32,
      name=name,
  )


class BasicBlock(nn.Module):
  """torchvision BasicBlock (expansion 1)."""

  planes: int
  stride: int = 1
  downsample: bool = False
  compute_dtype: Any = jnp.float32

  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dt = self.compute_dtype
    identity = x
    out = _conv(self.planes, 3, self.stride, 1, "conv1", dt)(x)
    out = nn.relu(_bn("bn1", dt)(out))
    out = _conv(self.planes, 3, 1, 1, "conv2", dt)(out)
    out = _bn("bn2", dt)(out)
    if self.downsample:
      identity = _conv(self.planes, 1, self.stride, 0, "downsample_0", dt)(x)
      identity = _bn("downsample_1", dt)(identity)
    return nn.relu(out + identity)


class Bottleneck(nn.Module):
  """torchvision Bottleneck v1.5 (stride on the 3x3 conv, expansion 4)."""

  planes: int
  stride: int = 1
  downsample: bool = False
  width_per_group: int = 64
  compute_dtype: Any = jnp.float32

  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dt = self.compute_dtype
    width = int(self.planes * (self.width_per_group / 64.0))  # groups == 1
    out_ch = self.planes * self.expansion
    identity = x
    out = _conv(width, 1, 1, 0, "conv1", dt)(x)
    out = nn.relu(_bn("bn1", dt)(out))
    out = _conv(width, 3, self.stride, 1, "conv2", dt)(out)
    out = nn.relu(_bn("bn2", dt)(out))
    out = _conv(out_ch, 1, 1, 0, "conv3", dt)(out)
    out = _bn("bn3", dt)(out)
    if self.downsample:
      identity = _conv(out_ch, 1, self.stride, 0, "downsample_0", dt)(x)
      identity = _bn("downsample_1", dt)(identity)
    return nn.relu(out + identity)


class ResNet(nn.Module):
  """torchvision-compatible ResNet feature extractor.

  ``__call__(x, max_level=4, with_logits=False)`` takes NHWC normalised
  images and returns ``{'level1': ..., 'level{max_level}': ...}`` (outputs of
  ``layer1``..``layer{max_level}``; later stages are not computed).  With
  ``with_logits=True`` all four stages run and the dict additionally holds
  ``'logits'`` (global average pool + ``fc``, 1000 ImageNet classes) and all
  four levels.  Outputs are in ``compute_dtype``; parameters are float32.
  """

  arch: str
  compute_dtype: Any = jnp.float32

  @nn.compact
  def __call__(
      self, x: jax.Array, max_level: int = 4, with_logits: bool = False
  ) -> dict[str, jax.Array]:
    block_type, layers, width_per_group = _check_arch(self.arch)
    if not 1 <= int(max_level) <= 4:
      raise ValueError(f"max_level must be in 1..4, got {max_level}")
    if x.ndim != 4:
      raise ValueError(f"expected NHWC input, got shape {x.shape}")
    if with_logits:
      max_level = 4
    dt = self.compute_dtype

    x = x.astype(dt)
    x = _conv(64, 7, 2, 3, "conv1", dt)(x)
    x = nn.relu(_bn("bn1", dt)(x))
    # max_pool pads with the reduction's init value (-inf), like PyTorch.
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    expansion = 1 if block_type == "basic" else 4
    inplanes = 64
    feats: dict[str, jax.Array] = {}
    for stage in range(1, max_level + 1):
      planes = 64 * 2 ** (stage - 1)
      stage_stride = 1 if stage == 1 else 2
      for b in range(layers[stage - 1]):
        stride = stage_stride if b == 0 else 1
        downsample = b == 0 and (stride != 1 or inplanes != planes * expansion)
        name = f"layer{stage}_{b}"
        if block_type == "basic":
          block = BasicBlock(planes, stride, downsample, dt, name=name)
        else:
          block = Bottleneck(planes, stride, downsample, width_per_group, dt, name=name)
        x = block(x)
        inplanes = planes * expansion
      feats[f"level{stage}"] = x

    if with_logits:
      pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
      feats["logits"] = nn.Dense(
          NUM_CLASSES, dtype=jnp.float32, param_dtype=jnp.float32, name="fc"
      )(pooled)
    return feats


def init_random(arch: str, rng: jax.Array, input_size: int | tuple[int, int] = 224) -> dict:
  """Randomly initialised variables ``{'params', 'batch_stats'}`` incl. ``fc``."""
  _check_arch(arch)
  if isinstance(input_size, int):
    input_size = (input_size, input_size)
  h, w = input_size
  x = jnp.zeros((1, h, w, 3), jnp.float32)
  # jit: eager init compiles every initializer op separately (~10x slower)
  variables = jax.jit(lambda r, x: ResNet(arch).init(r, x, max_level=4, with_logits=True))(rng, x)
  return {"params": variables["params"], "batch_stats": variables["batch_stats"]}


# --------------------------------------------------------------------------
# torch state-dict conversion
# --------------------------------------------------------------------------

_LEAF_TO_TORCH = {
    ("params", "kernel"): "weight",
    ("params", "bias"): "bias",
    ("params", "scale"): "weight",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}

_MODULE_RE = re.compile(r"^(layer\d+|downsample)_(\d+)$")


def _flax_module_to_torch(name: str) -> str:
  m = _MODULE_RE.match(name)
  return f"{m.group(1)}.{m.group(2)}" if m else name


def flax_path_to_torch_key(collection: str, path: tuple[str, ...]) -> str:
  """Torch state-dict key for the flax variable ``collection/path``."""
  *modules, leaf = path
  suffix = _LEAF_TO_TORCH[(collection, leaf)]
  return ".".join([_flax_module_to_torch(m) for m in modules] + [suffix])


def _expected_shapes(arch: str) -> dict[str, dict]:
  """Flax variable shapes (incl. fc) via ``jax.eval_shape`` (no compute)."""
  shapes = jax.eval_shape(lambda: init_random(arch, jax.random.PRNGKey(0), input_size=32))
  return jax.tree_util.tree_map(lambda s: tuple(s.shape), shapes)


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # torch.Tensor passed directly
    value = value.detach().cpu().numpy()
  return np.asarray(value)


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return out


def from_torch_state_dict(state_dict: Mapping[str, Any], arch: str) -> dict:
  """Convert a torchvision ResNet ``state_dict`` (numpy arrays) to flax variables.

  Returns ``{'params': ..., 'batch_stats': ...}`` (float32 jax arrays).
  Conv kernels OIHW -> HWIO, ``fc.weight`` transposed, BN weight -> scale,
  running_mean/var -> mean/var.  Every tensor is used exactly once;
  ``*.num_batches_tracked`` buffers of BN layers are ignored.  Missing or
  unknown keys and shape mismatches raise ``ValueError``.
  """
  _check_arch(arch)
  expected = _flatten(_expected_shapes(arch))

  # torch key -> (flax path incl. collection, flax shape)
  key_map: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {}
  bn_prefixes: set[str] = set()
  for full_path, shape in expected.items():
    collection, path = full_path[0], full_path[1:]
    tkey = flax_path_to_torch_key(collection, path)
    if tkey in key_map:  # pragma: no cover - would be a naming bug
      raise AssertionError(f"duplicate torch key {tkey}")
    key_map[tkey] = (full_path, shape)
    if collection == "batch_stats":
      bn_prefixes.add(tkey.rsplit(".", 1)[0])

  ignored = {f"{p}.num_batches_tracked" for p in bn_prefixes}
  given = set(state_dict)
  missing = sorted(set(key_map) - given)
  unknown = sorted(given - set(key_map) - ignored)
  if missing or unknown:
    parts = []
    if missing:
      parts.append(f"missing keys ({len(missing)}): {missing}")
    if unknown:
      parts.append(f"unknown keys ({len(unknown)}): {unknown}")
    raise ValueError(f"state_dict does not match {arch}: " + "; ".join(parts))

  flat_out: dict[tuple[str, ...], jax.Array] = {}
  bad_shapes = []
  for tkey, (full_path, shape) in key_map.items():
    arr = _to_numpy(state_dict[tkey]).astype(np.float32)
    leaf = full_path[-1]
    if leaf == "kernel":
      if arr.ndim == 4:
        arr = arr.transpose(2, 3, 1, 0)  # OIHW -> HWIO
      elif arr.ndim == 2:
        arr = arr.T  # Linear (out, in) -> Dense (in, out)
    if tuple(arr.shape) != tuple(shape):
      bad_shapes.append(
          f"{tkey}: got {tuple(_to_numpy(state_dict[tkey]).shape)} "
          f"-> {tuple(arr.shape)}, expected flax shape {tuple(shape)}"
      )
      continue
    flat_out[full_path] = jnp.asarray(np.ascontiguousarray(arr))
  if bad_shapes:
    raise ValueError(f"shape mismatch for {arch}: " + "; ".join(bad_shapes))

  out = _unflatten(flat_out)
  return {"params": out["params"], "batch_stats": out["batch_stats"]}
