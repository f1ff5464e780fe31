"""The trained parts of CRAS: adapter A (docs/method.md §3) and discriminator D (docs/method.md §7).

Small Flax modules with PyTorch's initialisation and BatchNorm conventions, so
one training step reproduces the reference to float precision.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from cras_jax.method import loss as loss_lib

xavier_normal = nn.initializers.xavier_normal()


def matmul(x, w, dtype):
  """x @ w in `dtype` (float32 accumulation for float32), as TorchLinear computes it."""
  pref = jnp.float32 if dtype == jnp.float32 else None
  return jnp.dot(x.astype(dtype), w.astype(dtype), preferred_element_type=pref)


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
    y = matmul(x, kernel, self.dtype)
    if self.use_bias:
      y = y + self.param("bias", torch_bias_init(fan_in), (self.features,), jnp.float32).astype(
          y.dtype
      )
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
  # Per-device code (train.parallelism shard_map / pmap): the mesh axis the batch is split
  # over; the batch mean and variance are then averaged over it (equal shares per device).
  axis_name: str | None = None
  # The batch statistics in one pass over x (the "xla" kernels' form): the mean and mean
  # square of x - shift, shift being the running mean (the same on every device, no gradient),
  # var = E[(x - s)^2] - E[x - s]^2. The two-pass form reads x twice (mean, then the squares
  # about it): on accelerators a read of the discriminator's widest activations per step. The
  # shift keeps the difference well conditioned once the running mean tracks the batch's
  # (at the first step it is zero: the plain one-pass form, float32 sums).
  one_pass: bool = False

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
      if self.axis_name is not None:
        n *= jax.lax.axis_size(self.axis_name)
      mean, var = (_one_pass_stats if self.one_pass else _two_pass_stats)(
          xf, axes, ra_mean.value, self.axis_name
      )
      # One value of the batch statistics for the normalisation and the running update: left
      # to fusion, XLA may compute the variance twice, summed in orders that differ between
      # programs (a population member would then not be bit-identical to its run alone).
      mean, var = jax.lax.optimization_barrier((mean, var))
      if not self.is_initializing():
        ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
        ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * var * (
            n / max(n - 1, 1)
        )
    else:
      mean, var = ra_mean.value, ra_var.value
    y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    return y.astype(x.dtype)


def _pmean(x, axis_name: str | None):
  return x if axis_name is None else jax.lax.pmean(x, axis_name)


def _two_pass_stats(xf, axes, shift, axis_name):
  """The batch mean, then the mean square about it (PyTorch's biased variance)."""
  del shift
  mean = _pmean(xf.mean(axes), axis_name)
  return mean, _pmean(jnp.square(xf - mean).mean(axes), axis_name)


def _one_pass_stats(xf, axes, shift, axis_name):
  """The same statistics from one pass over x - shift (`TorchBatchNorm.one_pass`)."""
  d = xf - shift
  m1, m2 = _pmean((d.mean(axes), jnp.square(d).mean(axes)), axis_name)
  return shift + m1, jnp.maximum(m2 - jnp.square(m1), 0.0)


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


# ----------------------------------------------------------------------------- exact rewrites
#
# The discriminator's first layer sees a CRD input that is linear in (u, p):
# [u | u - p] @ W = u @ (W1 + W2) - p @ W2, and likewise for every CRD mode. So
# the first layer is u @ A + p @ B + b with A, B fixed by the mode. In training
# the normal row u and the synthetic row v share the same p, so p @ B is computed
# once per row pair (3 products of D x H instead of 4). At inference the centres
# are fixed: centres @ B is computed once per run and gathered by the matched
# index, and the inference BatchNorm (an affine map) is folded into the Linear
# weights. The results equal the plain form up to float32 rounding (the sums are
# taken in another order).


def crd_first_layer(kernel: jax.Array, crd_input: str, embed_dim: int):
  """(A, B) with crd_inputs(u, p, mode) @ kernel == u @ A + p @ B (B None: no p term).

  The kernel's rows are one block of embed_dim per part of the input: every part
  contributes its block to A, and a residual part (u - p) its negated block to B."""
  a = b = None
  for i, part in enumerate(loss_lib.crd_parts(crd_input)):
    block = kernel[i * embed_dim : (i + 1) * embed_dim]
    a = block if a is None else a + block
    if part == "residual":
      b = -block if b is None else b - block
  return a, b


def _first_name(n_layers: int) -> str:
  return "block1_fc" if n_layers > 1 else "tail"


def discriminator_split(
    params,
    batch_stats,
    u,
    p,
    offsets=(),
    n_layers: int = 3,
    crd_input: str = "raw_residual",
    train: bool = True,
    dtype=jnp.float32,
    axis_name: str | None = None,
    parts_leading: bool = False,
    one_pass_stats: bool = False,
):
  """The Discriminator on the rows crd_inputs([u; u + o_1; ...], p), sharing products.

  u, p [N, D]; offsets: arrays [N, D] without gradient (training: the DAFS noise
  alpha * g, so that u + o is the synthetic feature v). The first layer is
  `u @ A + p @ B + b` (`crd_first_layer`): p @ B is computed once for all rows, and
  (u + o) @ A as u @ A + o @ A, so the backward pass takes the gradient of u through A
  once for all rows instead of once per row. Returns (logits [N, 1 + len(offsets)], new
  batch_stats or None): column 0 is Discriminator.apply on crd_inputs(u, p), column k on
  crd_inputs(u + o_k, p), up to float32 rounding. Row i's logits stay row i's: with the batch
  split over devices, reordering the rows to [u; v] moved logits between devices (an
  all-to-all and collective-permutes in the partitioned program, forward and backward).
  `axis_name`: per-device code's mesh axis (`TorchBatchNorm`). `parts_leading`: the rows held
  as [parts, N, H] instead of interleaved [N * parts, H] (the "xla" kernels' layout).
  `one_pass_stats`: the BatchNorms' batch statistics in one pass (`TorchBatchNorm.one_pass`).
  """
  d = u.shape[-1]
  first = params[_first_name(n_layers)]
  a, b = crd_first_layer(first["kernel"], crd_input, d)
  hu = matmul(u, a, dtype)
  if b is not None:
    hu = hu + matmul(p, b, dtype)
  # Each part is formed before concatenating: the transpose is then an elementwise sum of
  # the parts' cotangents (a tiled term's transpose became a slow reduction on CPU).
  hs = [hu] + [hu + matmul(o, a, dtype) for o in offsets]
  if parts_leading:
    # [parts, N, H1]: the layers act on the last axis and BatchNorm on all the others. The
    # interleaved rows below put a dimension of 2 second-minor, which the TPU compiler pads
    # and copies to reshape, forward and backward.
    h = jnp.stack(hs, axis=0)
    by_row = lambda z: z.T  # [parts, N] -> [N, parts]
  else:
    # Rows interleaved (u_0, v_0, u_1, v_1, ...), [N * parts, H1]: with the batch split over
    # devices each device keeps its own rows (a concatenation [u; v] made XLA move half of
    # them between devices); on XLA:CPU 8 % faster than the parts-leading form.
    h = jnp.stack(hs, axis=1).reshape(-1, hu.shape[-1]) if len(hs) > 1 else hs[0]
    by_row = lambda z: z.reshape(-1, len(hs))  # [N * parts] interleaved -> [N, parts]
  if "bias" in first:
    h = h + first["bias"].astype(h.dtype)
  if n_layers == 1:
    return by_row(h[..., 0].astype(jnp.float32)), None
  new_stats = {}
  for i in range(n_layers - 1):
    name = f"block{i + 1}"
    if i > 0:
      fc = params[f"{name}_fc"]
      h = matmul(h, fc["kernel"], dtype) + fc["bias"].astype(h.dtype)
    bn_vars = {"params": params[f"{name}_bn"], "batch_stats": batch_stats[f"{name}_bn"]}
    if train:
      bn = TorchBatchNorm(axis_name=axis_name, one_pass=one_pass_stats)
      h, upd = bn.apply(bn_vars, h, True, mutable=["batch_stats"])
      new_stats[f"{name}_bn"] = upd["batch_stats"]
    else:
      h = TorchBatchNorm().apply(bn_vars, h, False)
    h = nn.leaky_relu(h, 0.2)
  logits = matmul(h, params["tail"]["kernel"], dtype)[..., 0].astype(jnp.float32)
  return by_row(logits), (new_stats if train else None)


def fold_discriminator(
    params, batch_stats, n_layers: int, crd_input: str, embed_dim: int, epsilon: float = 1e-5
) -> dict:
  """Inference-only discriminator weights with BatchNorm folded into each Linear.

  -> {"a": [D, H1], "b": [D, H1] or None, "bias": [H1], "hidden": [(kernel, bias)...],
  "tail": [H, 1]} where layer i computes leaky(x @ kernel + bias) with the running
  statistics already applied: s = scale / sqrt(var + eps), kernel' = kernel * s,
  bias' = (bias - mean) * s + beta.
  """
  first = params[_first_name(n_layers)]
  a, b = crd_first_layer(first["kernel"], crd_input, embed_dim)
  bias = first.get("bias", jnp.zeros((a.shape[-1],), jnp.float32))
  out = {"hidden": []}
  if n_layers == 1:
    out.update(a=a, b=b, bias=bias, tail=None)
    return out

  def bn_affine(name):
    p, s = params[f"{name}_bn"], batch_stats[f"{name}_bn"]
    scale = p["scale"] * jax.lax.rsqrt(s["var"] + epsilon)
    return scale, p["bias"] - s["mean"] * scale

  s1, c1 = bn_affine("block1")
  out.update(a=a * s1, b=None if b is None else b * s1, bias=bias * s1 + c1)
  for i in range(1, n_layers - 1):
    name = f"block{i + 1}"
    fc = params[f"{name}_fc"]
    s, c = bn_affine(name)
    out["hidden"].append((fc["kernel"] * s, fc["bias"] * s + c))
  out["tail"] = params["tail"]["kernel"]
  return out


def apply_folded_discriminator(
    folded: dict, u: jax.Array, pb: jax.Array | None, dtype=jnp.float32
) -> jax.Array:
  """Logits of the folded discriminator. u [..., D]; pb [..., H1] = (matched p) @ B' or None."""
  h = matmul(u, folded["a"], dtype)
  if pb is not None:
    h = h + pb.astype(h.dtype)
  h = h + folded["bias"].astype(h.dtype)
  if folded["tail"] is None:
    return h[..., 0].astype(jnp.float32)
  h = nn.leaky_relu(h, 0.2)
  for kernel, bias in folded["hidden"]:
    h = nn.leaky_relu(matmul(h, kernel, dtype) + bias.astype(h.dtype), 0.2)
  return matmul(h, folded["tail"], dtype)[..., 0].astype(jnp.float32)
