"""The exact rewrites of the fast paths against the plain forms they replace.

Each rewrite changes only the order of float32 sums: the discriminator's first
layer split into u and p terms, inference BatchNorm folded into the Linear
layers, the centre terms computed once per centre vector, patch aggregation as
one matrix per level, depthwise convolutions as shifted multiply-adds, and local
matching without normalising u.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cras_jax.backbones import layers as eff
from cras_jax.engine import model
from cras_jax.method import features, heads, matching
from cras_jax.method import loss as loss_lib

RNG = np.random.default_rng(0)
MODES = ("raw_residual", "raw", "residual", "raw_raw", "residual_residual")


def _disc_vars(n_layers, width, seed=0):
  disc = heads.Discriminator(n_layers)
  v = disc.init(jax.random.PRNGKey(seed), jnp.zeros((2, width)), train=False)
  # Non-trivial running statistics, so that folding them is tested.
  stats = jax.tree.map(
      lambda x: jnp.asarray(RNG.uniform(0.5, 1.5, x.shape), jnp.float32), v.get("batch_stats", {})
  )
  return disc, v["params"], stats


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    # interleaved rows and two-pass statistics (cpu_tuned), parts-leading and one-pass (xla)
    "n_layers,xla",
    [
        (1, False),
        pytest.param(2, False, marks=pytest.mark.slow),
        pytest.param(3, False, marks=pytest.mark.slow),
        pytest.param(1, True, marks=pytest.mark.slow),
        (3, True),
    ],
)
def test_discriminator_split_equals_module(mode, n_layers, xla):
  d, n = 12, 40
  width = d * (1 if mode in ("raw", "residual") else 2)
  disc, params, stats = _disc_vars(n_layers, width)
  u, o, p = (jnp.asarray(RNG.normal(size=(n, d)), jnp.float32) for _ in range(3))
  variables = {"params": params, "batch_stats": stats} if stats else {"params": params}

  def plain(params, u):
    x = jnp.concatenate([loss_lib.crd_inputs(u, p, mode), loss_lib.crd_inputs(u + o, p, mode)])
    return disc.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])

  def split(params, u):
    logits, new = heads.discriminator_split(
        params, stats, u, p, [o], n_layers, mode, True, parts_leading=xla, one_pass_stats=xla
    )
    return logits.T.reshape(-1), new  # [N, 2] -> the plain module's [u; v] order

  ref, upd = plain(params, u)
  got, new_stats = split(params, u)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  if n_layers > 1:
    for a, b in zip(jax.tree.leaves(new_stats), jax.tree.leaves(upd["batch_stats"])):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # The backward pass too: gradients of a loss of the logits for the weights and for u.
  w = jnp.asarray(RNG.normal(size=(2 * n,)), jnp.float32)
  g_ref = jax.grad(lambda q, x: jnp.sum(w * jnp.tanh(plain(q, x)[0])), argnums=(0, 1))(params, u)
  g_got = jax.grad(lambda q, x: jnp.sum(w * jnp.tanh(split(q, x)[0])), argnums=(0, 1))(params, u)
  for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # Inference mode: the running statistics.
  x = jnp.concatenate([loss_lib.crd_inputs(u, p, mode), loss_lib.crd_inputs(u + o, p, mode)])
  ref = disc.apply(variables, x, train=False)
  got, none = heads.discriminator_split(
      params, stats, u, p, [o], n_layers, mode, False, parts_leading=xla
  )
  assert none is None and got.shape == (n, 2)
  np.testing.assert_allclose(got.T.reshape(-1), ref, rtol=1e-5, atol=1e-5)


def _batch_norm_train(x, ra_mean, one_pass, axis_name=None):
  bn = heads.TorchBatchNorm(axis_name=axis_name, one_pass=one_pass)
  c = x.shape[-1]
  variables = {
      "params": {"scale": jnp.full((c,), 1.5), "bias": jnp.full((c,), 0.25)},
      "batch_stats": {"mean": ra_mean, "var": jnp.full((c,), 2.0)},
  }
  y, upd = bn.apply(variables, x, True, mutable=["batch_stats"])
  return y, upd["batch_stats"]


@pytest.mark.parametrize("offset", [0.0, 40.0])
def test_one_pass_batch_statistics_equal_the_two_pass_ones(offset):
  # Channels with means far from zero (offset, in units of their spread): the running mean
  # as the shift keeps the one-pass variance as accurate as the two-pass one; from a zero
  # running mean (the first step) it is the plain one-pass form, still within float32's
  # reach at this offset.
  c = 6
  x = jnp.asarray(RNG.normal(offset, RNG.uniform(0.5, 2.0, c), size=(4, 50, c)), jnp.float32)
  near = jnp.asarray(offset + RNG.normal(0.0, 0.3, c), jnp.float32)
  y2, s2 = _batch_norm_train(x, near, one_pass=False)
  x64 = np.asarray(x, np.float64).reshape(-1, c)
  np.testing.assert_allclose(s2["var"], 0.9 * 2.0 + 0.1 * x64.var(0, ddof=1), rtol=1e-6)
  # From a zero shift the variance loses about float32's epsilon x (mean / spread)^2.
  for ra_mean, err in ((near, 0.0), (jnp.zeros((c,)), 5e-7 * offset**2)):
    y1, s1 = _batch_norm_train(x, ra_mean, one_pass=True)
    np.testing.assert_allclose(s1["var"], s2["var"], rtol=1e-6 + err)
    mean_ref = 0.9 * np.asarray(ra_mean, np.float64) + 0.1 * x64.mean(0)
    np.testing.assert_allclose(s1["mean"], mean_ref, rtol=1e-6, atol=1e-6)
    # y itself: x - mean rounds at the size of x (float32's epsilon x offset), either way.
    np.testing.assert_allclose(y1, y2, rtol=0, atol=1e-5 + 1e-6 * offset + 3 * err)
  # Per-device code: each device's sums averaged over the axis are the whole batch's (the
  # shift, the running mean, is the same on every device).
  y4, s4 = jax.vmap(lambda xs: _batch_norm_train(xs, near, True, "d"), axis_name="d")(x)
  _, s1 = _batch_norm_train(x, near, one_pass=True)
  for k in ("mean", "var"):
    np.testing.assert_allclose(s4[k], np.broadcast_to(s1[k], s4[k].shape), rtol=1e-6)
  np.testing.assert_allclose(y4, y2, rtol=0, atol=1e-5 + 1e-6 * offset)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n_layers", [1, 3])
def test_folded_discriminator_equals_inference_module(mode, n_layers):
  d, n = 12, 30
  width = d * (1 if mode in ("raw", "residual") else 2)
  disc, params, stats = _disc_vars(n_layers, width, seed=1)
  u, p = (jnp.asarray(RNG.normal(size=(n, d)), jnp.float32) for _ in range(2))
  variables = {"params": params, "batch_stats": stats} if stats else {"params": params}
  ref = disc.apply(variables, loss_lib.crd_inputs(u, p, mode), train=False)
  folded = heads.fold_discriminator(params, stats, n_layers, mode, d)
  b = folded.pop("b")
  got = heads.apply_folded_discriminator(folded, u, None if b is None else p @ b)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["raw_residual", "raw", "residual_residual"])
@pytest.mark.parametrize("hpi,per_image", [(True, True), (True, False), (False, True)])
def test_prepared_scoring_equals_plain_scoring(mode, hpi, per_image):
  k, hw, d = 3, 16, 10
  cfg = model.HeadsConfig(embed_dim=d, crd_input=mode, hpi=hpi, per_image_matching=per_image)
  params, stats = model.init_heads(cfg, jax.random.PRNGKey(2))
  stats = jax.tree.map(lambda x: jnp.asarray(RNG.uniform(0.5, 1.5, x.shape), jnp.float32), stats)
  centres = jnp.asarray(RNG.normal(size=(k, hw, d)), jnp.float32)
  t = jnp.asarray(RNG.normal(size=(5, hw, d)), jnp.float32)
  ref = model.score_features(params, stats, t, centres, (4, 4), (16, 16), cfg)
  prep = model.prepare_scoring(params, stats, centres, cfg)
  got = model.score_prepared(prep, t, (4, 4), (16, 16), cfg)
  np.testing.assert_array_equal(got["cls"], ref["cls"])
  for key in ("scores", "maps", "patch"):
    np.testing.assert_allclose(got[key], ref[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_matching_without_normalising_u_is_cosine_argmax():
  # Rows of very different lengths: the index must not depend on |u|.
  u = RNG.normal(size=(4, 20, 8)) * RNG.uniform(0.01, 100, size=(4, 20, 1))
  c = RNG.normal(size=(2, 20, 8)) * RNG.uniform(0.01, 100, size=(2, 20, 1))
  labels = np.array([0, 1, 1, 0])
  cos = np.einsum(
      "bnd,bmd->bnm",
      u / np.linalg.norm(u, axis=-1, keepdims=True),
      (c / np.linalg.norm(c, axis=-1, keepdims=True))[labels],
  )
  u, c = jnp.asarray(u, jnp.float32), jnp.asarray(c, jnp.float32)
  idx, p = matching.match_known(u, c, jnp.asarray(labels))
  np.testing.assert_array_equal(idx, cos.argmax(-1))
  idx2, _ = matching.match_known(u, c, jnp.asarray(labels), True, matching.unit_centres(c))
  np.testing.assert_array_equal(idx2, idx)
  np.testing.assert_array_equal(p, np.asarray(c)[labels[:, None], np.asarray(idx)])


def _np_reference_aggregate(levels, pre, d):
  """Unfold, pool, upsample, stack and pool again with dense NumPy matrices."""
  grid = levels[0].shape[1:3]
  parts = []
  for x in levels:
    b, h, w, c = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    taps = np.stack([xp[:, i : i + h, j : j + w] for i in range(3) for j in range(3)], -1)
    f = taps.reshape(b, h, w, c * 9) @ features.adaptive_pool_matrix(c * 9, pre)
    if (h, w) != grid:
      f = np.asarray(features.resize_bilinear(jnp.asarray(f, jnp.float32), grid))
    parts.append(f.reshape(b, grid[0] * grid[1], pre))
  return np.concatenate(parts, -1) @ features.adaptive_pool_matrix(len(levels) * pre, d)


@pytest.mark.parametrize(
    "channels,pre,d",
    [
        ((40, 112), 512, 512),  # Lite0: pre > C*9
        ((16, 32), 40, 24),  # the golden sizes
        ((8, 12), 24, 16),
    ],
)  # divisible: reshape-means
def test_aggregation_paths_equal_dense_reference(channels, pre, d):
  levels = [
      RNG.normal(size=(2, 8, 8, channels[0])).astype(np.float32),
      RNG.normal(size=(2, 4, 4, channels[1])).astype(np.float32),
  ]
  got = features.aggregate_patches([jnp.asarray(x) for x in levels], pre, d)
  np.testing.assert_allclose(got, _np_reference_aggregate(levels, pre, d), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize(
    "k,stride,hw", [(3, 1, (9, 7)), (3, 2, (9, 8)), (5, 2, (11, 10)), (5, 1, (6, 6))]
)
def test_depthwise_conv_equals_grouped_conv(k, stride, hw):
  c = 6
  x = jnp.asarray(RNG.normal(size=(2, *hw, c)), jnp.float32)
  kernel = jnp.asarray(RNG.normal(size=(k, k, 1, c)), jnp.float32)
  pads = eff.same_pads(hw, k, stride)
  ref = jax.lax.conv_general_dilated(
      x,
      kernel,
      (stride, stride),
      pads,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=c,
  )
  got = eff.depthwise_conv(x, kernel, stride, pads)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_pointwise_and_depthwise_modules_keep_conv_parameters():
  """The faster modules read the parameters nn.Conv would have (converted weights load)."""
  x = jnp.zeros((1, 8, 8, 4))
  dw = eff.DepthwiseConv(3, 1).init(jax.random.PRNGKey(0), x)
  pw = eff.PointwiseConv(5).init(jax.random.PRNGKey(0), x)
  ref_dw = nn.Conv(4, (3, 3), feature_group_count=4, use_bias=False).init(jax.random.PRNGKey(0), x)
  ref_pw = nn.Conv(5, (1, 1), use_bias=False).init(jax.random.PRNGKey(0), x)
  assert jax.tree.map(jnp.shape, dw) == jax.tree.map(jnp.shape, ref_dw)
  assert jax.tree.map(jnp.shape, pw) == jax.tree.map(jnp.shape, ref_pw)
  y = jnp.asarray(RNG.normal(size=(1, 8, 8, 4)), jnp.float32)
  np.testing.assert_allclose(
      eff.PointwiseConv(5).apply(ref_pw, y),
      nn.Conv(5, (1, 1), use_bias=False).apply(ref_pw, y),
      rtol=1e-5,
      atol=1e-6,
  )
