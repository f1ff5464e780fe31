"""The two kernel forms (cras_jax/backbones/layers.py): equal forward and backward on the CPU."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cras_jax import backbones
from cras_jax.backbones import layers
from cras_jax.method import features


def _allclose(a, b, tol=2e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def test_resolve_kernels_auto_per_platform():
  assert layers.resolve_kernels("auto", "cpu") == "cpu_tuned"
  assert layers.resolve_kernels("auto", "gpu") == "xla"
  assert layers.resolve_kernels("auto", "tpu") == "xla"
  assert layers.resolve_kernels("xla", "cpu") == "xla"
  assert layers.resolve_kernels("cpu_tuned", "tpu") == "cpu_tuned"
  with pytest.raises(ValueError, match="model.kernels"):
    layers.resolve_kernels("fast")


@pytest.mark.parametrize("stride,k,size", [(1, 3, 9), (2, 5, 10)])
def test_depthwise_forms_equal_forward_and_backward(stride, k, size):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, size, size, 6), np.float32))
  kern = jnp.asarray(rng.standard_normal((k, k, 1, 6), np.float32))
  pads = layers.same_pads(x.shape[1:3], k, stride)
  hi = jax.lax.Precision.HIGHEST

  @jax.jit
  def both(x, w):
    out = []
    for fn in (layers.depthwise_conv, layers.depthwise_conv_xla):
      f = lambda x, w, fn=fn: fn(x, w, stride, pads, hi)
      out.append((f(x, w), *jax.grad(lambda x, w, f=f: jnp.sum(jnp.sin(f(x, w))), (0, 1))(x, w)))
    return out

  tuned, plain = both(x, kern)
  _allclose(tuned[0], plain[0])
  for u, v in zip(tuned[1:], plain[1:]):
    _allclose(u, v, 1e-4)


def test_pointwise_forms_equal_forward_and_backward():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 5, 5, 8), np.float32))
  hi = jax.lax.Precision.HIGHEST
  tuned = layers.PointwiseConv(12, precision=hi, form="cpu_tuned")
  plain = layers.PointwiseConv(12, precision=hi, form="xla")
  v = tuned.init(jax.random.PRNGKey(0), x)
  assert jax.tree.map(jnp.shape, v) == jax.tree.map(jnp.shape, plain.init(jax.random.PRNGKey(0), x))
  _allclose(tuned.apply(v, x), plain.apply(v, x))
  grads = [
      jax.grad(lambda v, x, m=m: jnp.sum(jnp.tanh(m.apply(v, x))), argnums=(0, 1))(v, x)
      for m in (tuned, plain)
  ]
  for u, w in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    _allclose(u, w, 1e-4)


def test_aggregation_forms_equal_forward_and_backward():
  rng = np.random.default_rng(3)
  # uneven poolings (40 * 9 = 360 -> 48; 2 * 48 -> 32): the matrix form on cpu_tuned
  levels = [
      jnp.asarray(rng.standard_normal((2, 8, 8, 40), np.float32)),
      jnp.asarray(rng.standard_normal((2, 4, 4, 24), np.float32)),
  ]

  def agg(form):
    return lambda ls: features.aggregate_patches(ls, 48, 32, 3, form)

  @jax.jit
  def both(levels):
    return [
        (agg(f)(levels), jax.grad(lambda ls, f=f: jnp.sum(jnp.sin(agg(f)(ls))))(levels))
        for f in ("cpu_tuned", "xla")
    ]

  (a, ga), (b, gb) = both(levels)
  _allclose(a, b)
  for u, v in zip(ga, gb):
    _allclose(u, v, 1e-4)


def test_efficientnet_forms_share_weights_and_agree():
  x = jnp.asarray(np.random.default_rng(4).standard_normal((1, 32, 32, 3), np.float32))
  tuned = backbones.build_module("efficientnet_lite0", "float32", "cpu_tuned")
  plain = backbones.build_module("efficientnet_lite0", "float32", "xla")
  v = jax.jit(lambda r: tuned.init(r, x, max_level=1))(jax.random.PRNGKey(0))
  # the xla form is grouped convolutions, the cpu_tuned form has none
  hlo = {
      name: jax.jit(lambda v, x, m=m: m.apply(v, x, max_level=1)).lower(v, x).as_text()
      for name, m in (("tuned", tuned), ("plain", plain))
  }
  groups = {
      k: {int(g) for g in re.findall(r"feature_group_count = (\d+)", t)} for k, t in hlo.items()
  }
  assert max(groups["plain"]) > 1 and groups["tuned"] <= {1}

  @jax.jit
  def both(v, x):
    with jax.default_matmul_precision("highest"):
      return [m.apply(v, x, max_level=1)["level1"] for m in (tuned, plain)]

  a, b = both(v, x)
  scale = float(jnp.abs(a).max())
  _allclose(a / scale, b / scale, 1e-4)
