"""EfficientNet-Lite (Lite0..Lite4) in Flax, with an offline, torch-free weight loader.

Architecture (docs/method.md §12; mirrors ``efficientnet_lite_pytorch`` 0.1.0, itself a
port of the TensorFlow ``efficientnet/lite`` builder):

* stem: 3x3 stride-2 conv (32 ch, never width-scaled) + BN + ReLU6;
* MBConv blocks (no squeeze-excitation): optional 1x1 expand conv + BN + ReLU6,
  kxk depthwise conv + BN + ReLU6, 1x1 project conv + BN (linear bottleneck, no
  activation); the input is added when stride is 1 and in/out channels match;
* head: 1x1 conv to 1280 (never width-scaled) + BN + ReLU6, global average pool,
  dropout (inference: identity), fc.
* BatchNorm eps 1e-3, ALWAYS in inference mode (running statistics): the backbone
  is frozen, there is no ``train`` switch.
* TF 'SAME' padding computed from the actual input size: total = max((ceil(i/s)-1)*s
  + k - i, 0), ``total // 2`` before and the rest after (extra pixel bottom/right).
  This is the reference's ``Conv2dDynamicSamePadding``; its ``Conv2dStaticSamePadding``
  (used when the module is built with an ``image_size``) gives the same pads when
  the input has that size. (Built for 224 but fed another size, the static module
  pads differently wherever a stride-2 conv sees an odd size.)

Input: NHWC float32, RGB in [0, 1] normalised with the ImageNet mean/std.

Levels (taps are block outputs, i.e. linear-bottleneck outputs without activation)::

    level   stride  tap                         lite0 (block, ch)   lite2 (block, ch)
    level1     4    end of stage 1                (2, 24)             (3, 24)
    level2     8    end of stage 2                (4, 40)             (6, 48)
    level3    16    end of stage 4                (10, 112)           (14, 120)
    level4    32    end of stage 6 (last block)   (15, 320)           (20, 352)

Pretrained weights (torch state dicts, converted without torch) are read by
``efficientnet_lite_weights``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cras_jax.backbones.layers import DepthwiseConv, PointwiseConv, same_pads

__all__ = [
    "EfficientNetLite",
    "level_channels",
    "level_block_indices",
    "block_specs",
    "stage_starts",
    "LEVELS",
    "LEVEL_STRIDES",
    "LEVEL_CHANNELS",
    "VARIANTS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

#: output keys of the levels, in order (``level_channels`` etc. use the ints 1..4)
LEVELS = ("level1", "level2", "level3", "level4")
#: output stride of each level (same convention as ``resnet.LEVEL_STRIDES``)
LEVEL_STRIDES: dict[int, int] = {1: 4, 2: 8, 3: 16, 4: 32}
#: stage whose last block is the level's tap
_LEVEL_STAGE = {1: 1, 2: 2, 3: 4, 4: 6}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

BN_EPS = 1e-3
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280

# (width_coefficient, depth_coefficient); resolution / dropout do not matter here
VARIANTS = {
    "lite0": (1.0, 1.0),
    "lite1": (1.0, 1.1),
    "lite2": (1.1, 1.2),
    "lite3": (1.2, 1.4),
    "lite4": (1.4, 1.8),
}

# repeats, kernel, stride, expand, in, out   (efficientnet_lite_builder.py)
_BASE_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  index: int
  stage: int
  kernel_size: int
  stride: int
  expand_ratio: int
  input_filters: int
  output_filters: int

  @property
  def expanded(self) -> int:
    return self.input_filters * self.expand_ratio

  @property
  def residual(self) -> bool:
    return self.stride == 1 and self.input_filters == self.output_filters


def check_variant(variant: str) -> str:
  v = variant.lower().replace("efficientnet-", "").replace("efficientnet_", "")
  if v not in VARIANTS:
    raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; one of {sorted(VARIANTS)}")
  return v


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
  f = filters * width
  new = max(divisor, int(f + divisor / 2) // divisor * divisor)
  if new < 0.9 * f:
    new += divisor
  return int(new)


def block_specs(variant: str = "lite0") -> tuple[BlockSpec, ...]:
  """All MBConv blocks of a variant, as the reference builds them."""
  v = check_variant(variant)
  width, depth = VARIANTS[v]
  specs = []
  n_stages = len(_BASE_STAGES)
  for s, (r, k, st, e, i, o) in enumerate(_BASE_STAGES):
    cin, cout = _round_filters(i, width), _round_filters(o, width)
    if s == 0:
      cin = STEM_CHANNELS  # fix_head_stem: stem not scaled
    # fix_head_stem: first and last stage keep their repeat count
    reps = r if s in (0, n_stages - 1) else int(math.ceil(depth * r))
    for j in range(reps):
      specs.append(
          BlockSpec(len(specs), s, k, st if j == 0 else 1, e, cin if j == 0 else cout, cout)
      )
  return tuple(specs)


def stage_starts(variant: str = "lite0") -> tuple[int, ...]:
  """Index of the first block of each stage (lite0: 0, 1, 3, 5, 8, 11, 15)."""
  specs = block_specs(variant)
  return tuple(next(b.index for b in specs if b.stage == s) for s in range(len(_BASE_STAGES)))


def level_block_indices(variant: str = "lite0") -> dict[int, int]:
  """Index of the block whose output is each level (lite0: {1: 2, 2: 4, 3: 10, 4: 15})."""
  specs = block_specs(variant)
  return {lvl: max(b.index for b in specs if b.stage == st) for lvl, st in _LEVEL_STAGE.items()}


def _level_channels_table():
  return {v: level_channels(v) for v in VARIANTS}


def level_channels(variant: str = "lite0") -> dict[int, int]:
  """Channels of each level (lite0: {1: 24, 2: 40, 3: 112, 4: 320}; lite2: 24, 48, 120, 352)."""
  specs = block_specs(variant)
  return {lvl: specs[i].output_filters for lvl, i in level_block_indices(variant).items()}


#: ``{variant: {level: channels}}`` for lite0..lite4
LEVEL_CHANNELS: dict[str, dict[int, int]] = _level_channels_table()


def _relu6(x):
  return jnp.clip(x, 0, 6)


class _Ops:
  """Conv / BN factories shared by the stem, the blocks and the head."""

  @staticmethod
  def conv(mod, x, features, kernel, stride, name, groups=1):
    if groups == 1 and kernel == 1 and stride == 1:
      return PointwiseConv(features, mod.compute_dtype, mod.precision, mod.kernels, name=name)(x)
    if groups > 1 and groups == x.shape[-1] == features:
      return DepthwiseConv(kernel, stride, mod.compute_dtype, mod.kernels, name=name)(x)
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=same_pads(x.shape[1:3], kernel, stride),
        feature_group_count=groups,
        use_bias=False,
        dtype=mod.compute_dtype,
        param_dtype=jnp.float32,
        precision=mod.precision,
        name=name,
    )(x)

  @staticmethod
  def bn(mod, x, name):
    return nn.BatchNorm(
        use_running_average=True,
        momentum=0.99,
        epsilon=BN_EPS,
        dtype=mod.compute_dtype,
        param_dtype=jnp.float32,
        name=name,
    )(x)


class MBConvBlock(nn.Module):
  spec: BlockSpec
  compute_dtype: Any = jnp.float32
  precision: Any = None
  kernels: str = "cpu_tuned"  # layers.FORMS: the convolutions' form

  @nn.compact
  def __call__(self, inputs):
    b = self.spec
    x = inputs
    if b.expand_ratio != 1:
      x = _relu6(_Ops.bn(self, _Ops.conv(self, x, b.expanded, 1, 1, "_expand_conv"), "_bn0"))
    x = _Ops.conv(
        self, x, b.expanded, b.kernel_size, b.stride, "_depthwise_conv", groups=b.expanded
    )
    x = _relu6(_Ops.bn(self, x, "_bn1"))
    x = _Ops.bn(self, _Ops.conv(self, x, b.output_filters, 1, 1, "_project_conv"), "_bn2")
    if b.residual:
      x = x + inputs.astype(x.dtype)
    return x


class EfficientNetLite(nn.Module):
  """Frozen EfficientNet-Lite feature extractor (inference-mode BatchNorm).

  ``__call__(x, max_level=4, with_logits=False)`` takes NHWC ImageNet-normalised
  images and returns ``{'level1', ..., 'level<max_level>'}`` (float32, NHWC); with
  ``with_logits`` all four levels plus ``'logits'`` (float32, (B, num_classes)).
  Without logits, blocks after the ``max_level`` tap are not run. ``max_level``/``with_logits``
  are Python values (static under ``jax.jit``). ``compute_dtype`` sets the
  dtype of the convolutions/BN arithmetic; parameters stay float32.
  """

  variant: str = "lite0"
  num_classes: int = 1000
  compute_dtype: Any = jnp.float32
  precision: Any = None
  kernels: str = "cpu_tuned"  # layers.FORMS: the convolutions' form (backbones/layers.py)

  @nn.compact
  def __call__(self, x, max_level: int = 4, with_logits: bool = False):
    if max_level not in (1, 2, 3, 4):
      raise ValueError(f"max_level must be 1..4, got {max_level!r}")
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"expected NHWC RGB images, got shape {x.shape}")
    specs = block_specs(self.variant)
    taps = {i: lvl for lvl, i in level_block_indices(self.variant).items()}
    if with_logits:
      max_level = 4
    last = level_block_indices(self.variant)[max_level]

    x = x.astype(self.compute_dtype)
    x = _relu6(_Ops.bn(self, _Ops.conv(self, x, STEM_CHANNELS, 3, 2, "_conv_stem"), "_bn0"))
    out = {}
    for b in specs[: last + 1]:
      x = MBConvBlock(
          b, self.compute_dtype, self.precision, self.kernels, name=f"_blocks_{b.index}"
      )(x)
      lvl = taps.get(b.index)
      if lvl is not None:
        out[f"level{lvl}"] = x.astype(jnp.float32)
    if with_logits:
      x = _relu6(_Ops.bn(self, _Ops.conv(self, x, HEAD_CHANNELS, 1, 1, "_conv_head"), "_bn1"))
      x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
      x = nn.Dense(
          self.num_classes,
          dtype=jnp.float32,
          param_dtype=jnp.float32,
          precision=self.precision,
          name="_fc",
      )(x)
      out["logits"] = x
    return out
