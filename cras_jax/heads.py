"""The trained parts of CRAS: adapter A (SPEC 3) and discriminator D (SPEC 7).

Small Flax modules with PyTorch's initialisation and BatchNorm conventions, so
one training step reproduces the reference to float precision.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

xavier_normal = nn.initializers.xavier_normal()


def torch_bias_init(fan_in: int):
  """PyTorch's default Linear bias: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class TorchLinear(nn.Module):
  """Linear layer with Xavier-normal weights and PyTorch's default bias."""
  features: int
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[-1]
    kernel = self.param("kernel", xavier_normal, (fan_in, self.features), jnp.float32)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype),
                preferred_element_type=jnp.float32 if self.dtype == jnp.float32 else None)
    if self.use_bias:
      y = y + self.param("bias", torch_bias_init(fan_in), (self.features,), jnp.float32).astype(y.dtype)
    return y


class TorchBatchNorm(nn.Module):
  """BatchNorm1d with PyTorch semantics.

  Training normalises with the biased batch variance and updates the running
  variance with the unbiased one (n / (n - 1)), momentum 0.1 in PyTorch's
  convention (new = 0.9 old + 0.1 batch). Flax's BatchNorm uses the biased
  variance for the running statistics, which differs by n / (n - 1).
  """
  momentum: float = 0.1
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, train: bool):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    xf = x.astype(jnp.float32)
    if train:
      axes = tuple(range(xf.ndim - 1))
      n = math.prod(xf.shape[:-1])
      mean = xf.mean(axes)
      var = jnp.square(xf - mean).mean(axes)
      if not self.is_initializing():
        ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
        ra_var.value = ((1 - self.momentum) * ra_var.value
                        + self.momentum * var * (n / max(n - 1, 1)))
    else:
      mean, var = ra_mean.value, ra_var.value
    y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    return y.astype(x.dtype)


class Adapter(nn.Module):
  """A: `n_layers` Linear(D -> D) layers (the paper uses one)."""
  features: int
  n_layers: int = 1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, t):
    x = t
    for i in range(self.n_layers):
      x = TorchLinear(self.features, dtype=self.dtype, name=f"fc{i}")(x)
    return x.astype(jnp.float32)


class Discriminator(nn.Module):
  """D: (Linear + BatchNorm + LeakyReLU(0.2)) x (n_layers - 1), then Linear(., 1).

  Hidden widths halve from the input width (3072 -> 1536 -> 768 -> 1 in the
  paper). Returns logits [..., ]; the anomaly probability is sigmoid(logits).
  """
  n_layers: int = 3
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    width = x.shape[-1]
    for i in range(self.n_layers - 1):
      width = width // 2
      x = TorchLinear(width, dtype=self.dtype, name=f"block{i + 1}_fc")(x)
      x = TorchBatchNorm(name=f"block{i + 1}_bn")(x, train)
      x = nn.leaky_relu(x, 0.2)
    x = TorchLinear(1, use_bias=False, dtype=self.dtype, name="tail")(x)
    return x[..., 0].astype(jnp.float32)
