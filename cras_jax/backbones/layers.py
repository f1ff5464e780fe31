"""Convolution layers in two forms per platform, with ``nn.Conv``'s parameters.

``model.kernels`` chooses the form (docs/performance.md, "Kernels per platform"):
- ``"cpu_tuned"``: rewrites that XLA:CPU runs fast. Measured on the 2-core development CPU
  (batch 8, float32, jit): a 3x3 depthwise convolution on an 8x80x80x96 tensor took 140 ms as a
  grouped ``lax.conv`` and 11 ms as nine shifted multiply-adds; EfficientNet-Lite0 up to level 3
  at 160 px went from about 345 ms to 34 ms. 1x1 convolutions are matrix products (``dot``).
- ``"xla"``: the plain forms (``lax.conv_general_dilated``, grouped for depthwise), which GPUs
  (cuDNN) and TPUs (the convolution unit) run as native kernels.
- ``"auto"``: ``cpu_tuned`` on the CPU backend, ``xla`` on GPUs and TPUs (`resolve_kernels`).
Both forms have the same parameters (weights are interchangeable) and the same result up to
the order of additions (tests/backbones/test_layers.py, forward and backward).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

KERNELS = ("auto", "cpu_tuned", "xla")
FORMS = ("cpu_tuned", "xla")

_NHWC = ("NHWC", "HWIO", "NHWC")


def resolve_kernels(kernels: str, platform: str | None = None) -> str:
  """The form `kernels` means on `platform` (default: JAX's default backend):
  "auto" is "cpu_tuned" on "cpu" and "xla" elsewhere; the others are themselves."""
  if kernels not in KERNELS:
    raise ValueError(f"model.kernels={kernels!r}: choose one of {KERNELS}")
  if kernels != "auto":
    return kernels
  platform = platform or jax.default_backend()
  return "cpu_tuned" if platform == "cpu" else "xla"


def same_pads(in_hw, kernel: int, stride: int):
  """TF 'SAME' padding per spatial axis: ``total // 2`` before, the rest after."""
  pads = []
  for i in in_hw:
    o = -(-i // stride)
    total = max((o - 1) * stride + kernel - i, 0)
    pads.append((total // 2, total - total // 2))
  return tuple(pads)


def depthwise_conv(x, kernel, stride: int, pads, precision=None):
  """Depthwise kxk convolution as k*k shifted multiply-adds.

  ``kernel`` is (k, k, 1, C) as for ``lax.conv`` with ``feature_group_count=C``. XLA's
  CPU backend runs grouped convolutions slowly (tens of times slower than this form
  on an 8x80x80x96 tensor); shifted slices times a per-channel weight are plain
  elementwise work that XLA fuses into one loop, together with the BatchNorm and
  activation that follow. Same result up to the order of the k*k additions.
  """
  k = kernel.shape[0]
  b, h, w, c = x.shape
  (pt, pb), (pl, pr) = pads
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  oh = (h + pt + pb - k) // stride + 1
  ow = (w + pl + pr - k) // stride + 1
  wk = kernel.astype(x.dtype)
  acc = None
  for i in range(k):
    for j in range(k):
      tap = jax.lax.slice(
          xp,
          (0, i, j, 0),
          (b, i + (oh - 1) * stride + 1, j + (ow - 1) * stride + 1, c),
          (1, stride, stride, 1),
      )
      term = tap * wk[i, j, 0]
      acc = term if acc is None else acc + term
  return acc


def depthwise_conv_xla(x, kernel, stride: int, pads, precision=None):
  """Depthwise kxk convolution as one grouped ``lax.conv`` (``feature_group_count=C``)."""
  return jax.lax.conv_general_dilated(
      x,
      kernel.astype(x.dtype),
      (stride, stride),
      tuple(pads),
      dimension_numbers=_NHWC,
      feature_group_count=x.shape[-1],
      precision=precision,
  )


class DepthwiseConv(nn.Module):
  """Depthwise conv with ``nn.Conv``'s parameter (``kernel`` (k, k, 1, C)), computed
  by :func:`depthwise_conv` (form "cpu_tuned") or :func:`depthwise_conv_xla` ("xla")."""

  kernel_size: int
  stride: int
  compute_dtype: Any = jnp.float32
  form: str = "cpu_tuned"

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    kernel = self.param(
        "kernel",
        nn.initializers.lecun_normal(),
        (self.kernel_size, self.kernel_size, 1, c),
        jnp.float32,
    )
    pads = same_pads(x.shape[1:3], self.kernel_size, self.stride)
    fn = depthwise_conv if self.form == "cpu_tuned" else depthwise_conv_xla
    return fn(x.astype(self.compute_dtype), kernel, self.stride, pads)


class PointwiseConv(nn.Module):
  """1x1 convolution (``nn.Conv``'s parameter, ``kernel`` (1, 1, Cin, Cout)): a matrix product
  over channels (form "cpu_tuned") or a ``lax.conv`` ("xla")."""

  features: int
  compute_dtype: Any = jnp.float32
  precision: Any = None
  form: str = "cpu_tuned"

  @nn.compact
  def __call__(self, x):
    kernel = self.param(
        "kernel", nn.initializers.lecun_normal(), (1, 1, x.shape[-1], self.features), jnp.float32
    )
    if self.form == "xla":
      return jax.lax.conv_general_dilated(
          x.astype(self.compute_dtype),
          kernel.astype(self.compute_dtype),
          (1, 1),
          "VALID",
          dimension_numbers=_NHWC,
          precision=self.precision,
      )
    return jnp.dot(
        x.astype(self.compute_dtype),
        kernel[0, 0].astype(self.compute_dtype),
        precision=self.precision,
    )
