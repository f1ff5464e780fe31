"""Each pure function against an independent NumPy/SciPy computation."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from cras_jax.method import anomaly_map, features, matching, synthesis
from cras_jax.method import loss as loss_lib

RNG = np.random.default_rng(0)


def np_adaptive_pool(x, out):
  length = x.shape[-1]
  res = np.zeros(x.shape[:-1] + (out,), np.float64)
  for j in range(out):
    s = (j * length) // out
    e = int(np.ceil((j + 1) * length / out))
    res[..., j] = x[..., s:e].mean(-1)
  return res


def np_unfold(x, k=3):
  """Direct loop: [B,H,W,C] -> [B,H,W,C*k*k], channel-major then kernel row, column."""
  b, h, w, c = x.shape
  pad = k // 2
  out = np.zeros((b, h, w, c * k * k), np.float64)
  for i in range(h):
    for j in range(w):
      for ch in range(c):
        for ki in range(k):
          for kj in range(k):
            y, xx = i + ki - pad, j + kj - pad
            v = x[:, y, xx, ch] if 0 <= y < h and 0 <= xx < w else 0.0
            out[:, i, j, ch * k * k + ki * k + kj] = v
  return out


def np_bilinear_up(x, out_h, out_w):
  """PyTorch align_corners=False bilinear on [B,H,W,C] by an explicit loop."""
  b, h, w, c = x.shape
  res = np.zeros((b, out_h, out_w, c))
  for oy in range(out_h):
    sy = max((oy + 0.5) * h / out_h - 0.5, 0)
    y0 = min(int(np.floor(sy)), h - 1)
    y1 = min(y0 + 1, h - 1)
    ly = sy - y0
    for ox in range(out_w):
      sx = max((ox + 0.5) * w / out_w - 0.5, 0)
      x0 = min(int(np.floor(sx)), w - 1)
      x1 = min(x0 + 1, w - 1)
      lx = sx - x0
      res[:, oy, ox] = (1 - ly) * ((1 - lx) * x[:, y0, x0] + lx * x[:, y0, x1]) + ly * (
          (1 - lx) * x[:, y1, x0] + lx * x[:, y1, x1]
      )
  return res


def test_unfold_matches_loop():
  x = RNG.normal(size=(2, 5, 6, 4)).astype(np.float32)
  np.testing.assert_allclose(features.unfold3x3(jnp.asarray(x)), np_unfold(x), atol=1e-6)


@pytest.mark.parametrize("length,out", [(36, 12), (40, 24), (80, 24), (7, 3), (10, 10), (5, 8)])
def test_adaptive_pool_matches_loop(length, out):
  x = RNG.normal(size=(3, length)).astype(np.float32)
  np.testing.assert_allclose(
      features.adaptive_avg_pool_last(jnp.asarray(x), out), np_adaptive_pool(x, out), atol=1e-6
  )


def test_aggregate_matches_reference_order():
  """The reference order (unfold, upsample all C*9 components, pool, stack, pool)
  written as loops, against the pooled-first implementation."""
  l2 = RNG.normal(size=(2, 6, 6, 5)).astype(np.float32)
  l3 = RNG.normal(size=(2, 3, 3, 7)).astype(np.float32)
  pre, d = 11, 9
  u2 = np_unfold(l2)
  u3 = np_bilinear_up(np_unfold(l3), 6, 6)
  x = np.concatenate([np_adaptive_pool(u2, pre), np_adaptive_pool(u3, pre)], -1)
  ref = np_adaptive_pool(x, d).reshape(2, 36, d)
  got = features.aggregate_patches([jnp.asarray(l2), jnp.asarray(l3)], pre, d)
  np.testing.assert_allclose(got, ref, atol=1e-5)


def test_resize_bilinear_matches_loop():
  x = RNG.normal(size=(1, 4, 5, 2)).astype(np.float32)
  np.testing.assert_allclose(
      features.resize_bilinear(jnp.asarray(x), (8, 10)), np_bilinear_up(x, 8, 10), atol=1e-5
  )
  m = anomaly_map.bilinear_matrix(10, 5)
  np.testing.assert_allclose(np.einsum("oi,bhic->bhoc", m, x), np_bilinear_up(x, 4, 10), atol=1e-6)


def brute_force_match(u, c):
  idx = np.zeros(len(u), np.int64)
  for i, a in enumerate(u):
    best, arg = -np.inf, -1
    for j, b in enumerate(c):
      cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
      if cos > best:
        best, arg = cos, j
    idx[i] = arg
  return idx


def test_local_and_known_matching_brute_force():
  u = RNG.normal(size=(3, 10, 6)).astype(np.float32)
  c = RNG.normal(size=(2, 10, 6)).astype(np.float32)
  labels = np.array([1, 0, 1])
  idx, p = matching.match_known(jnp.asarray(u), jnp.asarray(c), jnp.asarray(labels))
  for b in range(3):
    ref = brute_force_match(u[b], c[labels[b]])
    np.testing.assert_array_equal(idx[b], ref)
    np.testing.assert_allclose(p[b], c[labels[b]][ref])


@pytest.mark.parametrize("hpi", [True, False])
def test_one_hot_class_rows_match_as_the_gather_does(hpi):
  """The "xla" form's matching (each image's centres by a one-hot product, normalised once for
  all classes, p gathered from the flattened centres) gives the gather form's indices and
  exactly its matched vectors."""
  u = RNG.normal(size=(4, 10, 6)).astype(np.float32)
  c = RNG.normal(size=(3, 10, 6)).astype(np.float32)
  labels = jnp.array([2, 0, 2, 1])
  np.testing.assert_array_equal(matching.class_rows(jnp.asarray(c), labels), c[[2, 0, 2, 1]])
  ref = matching.match_known(jnp.asarray(u), jnp.asarray(c), labels, hpi)
  got = jax.jit(lambda u, c: matching.match_known(u, c, labels, hpi, one_hot=True))(
      jnp.asarray(u), jnp.asarray(c)
  )
  np.testing.assert_array_equal(got[0], ref[0])
  np.testing.assert_array_equal(got[1], ref[1])
  k, idx, p = matching.match_infer(jnp.asarray(u), jnp.asarray(c), hpi, one_hot=True)
  np.testing.assert_array_equal(p, c[np.asarray(k)[:, None], np.asarray(idx)])


def test_without_hpi_takes_same_position():
  u = RNG.normal(size=(2, 10, 6)).astype(np.float32)
  c = RNG.normal(size=(2, 10, 6)).astype(np.float32)
  idx, p = matching.match_known(jnp.asarray(u), jnp.asarray(c), jnp.array([0, 1]), hpi=False)
  np.testing.assert_array_equal(idx, np.tile(np.arange(10), (2, 1)))
  np.testing.assert_allclose(p, c[[0, 1]])


def test_global_matching_brute_force_and_batch_mode():
  c = RNG.normal(size=(3, 10, 6)).astype(np.float32)
  u = c[[2, 0, 2, 1]] + 0.3 * RNG.normal(size=(4, 10, 6)).astype(np.float32)
  k, _, _ = matching.match_infer(jnp.asarray(u), jnp.asarray(c))
  ref = [
      int(
          np.argmax([ui.ravel() @ ck.ravel() / np.linalg.norm(ui) / np.linalg.norm(ck) for ck in c])
      )
      for ui in u
  ]
  np.testing.assert_array_equal(k, ref)
  kb, _, _ = matching.match_infer(jnp.asarray(u), jnp.asarray(c), per_image=False)
  np.testing.assert_array_equal(kb, [2, 2, 2, 2])


def test_dafs_invariants():
  u = RNG.normal(size=(2, 5, 4)).astype(np.float32)
  p = RNG.normal(size=(2, 5, 4)).astype(np.float32)
  g = 0.1 * RNG.normal(size=(2, 5, 4)).astype(np.float32)
  r = np.linalg.norm(u - p, axis=-1)
  n = np.linalg.norm(g, axis=-1)
  s = (n / r) / (n / r).mean()
  alpha = synthesis.dafs_alpha(jnp.asarray(u), jnp.asarray(p), jnp.asarray(g), 0.3)
  np.testing.assert_allclose(alpha, 0.3 * (s - 1) + 1, rtol=1e-5)
  np.testing.assert_allclose(jnp.mean(alpha), 1.0, rtol=1e-6)  # mean(s) = 1 => mean(alpha) = 1
  np.testing.assert_allclose(synthesis.dafs_alpha(u, p, g, 0.0), np.ones((2, 5)), rtol=1e-6)
  np.testing.assert_allclose(synthesis.dafs_alpha(u, p, g, 0.3, "no_scaling"), s, rtol=1e-5)
  v = synthesis.dafs(jnp.asarray(u), jnp.asarray(p), jnp.asarray(g), 0.3)
  np.testing.assert_allclose(v, u + np.asarray(alpha)[..., None] * g, rtol=1e-5, atol=1e-6)
  # A patch equal to its centre gets a finite alpha.
  p0 = p.copy()
  p0[0, 0] = u[0, 0]
  assert np.isfinite(np.asarray(synthesis.dafs_alpha(u, p0, g, 0.3))).all()
  # No gradient flows through alpha or g: dv/du is the identity.
  jac = jax.jacobian(lambda x: synthesis.dafs(x, p, g, 0.3).sum())(jnp.asarray(u))
  np.testing.assert_allclose(jac, np.ones_like(u))


def test_bce_matches_numpy():
  lt = RNG.normal(size=50).astype(np.float32)
  lf = RNG.normal(size=50).astype(np.float32)
  sig = lambda x: 1 / (1 + np.exp(-x.astype(np.float64)))
  a, b = loss_lib.bce_losses(jnp.asarray(lt), jnp.asarray(lf))
  np.testing.assert_allclose(a, -np.mean(np.log(1 - sig(lt))), rtol=1e-5)
  np.testing.assert_allclose(b, -np.mean(np.log(sig(lf))), rtol=1e-5)


def test_crd_input_modes():
  u = jnp.ones((1, 2, 3))
  p = jnp.zeros((1, 2, 3)) + 0.25
  assert loss_lib.crd_inputs(u, p).shape[-1] == 6
  np.testing.assert_allclose(loss_lib.crd_inputs(u, p, "residual"), np.full((1, 2, 3), 0.75))
  with pytest.raises(ValueError, match="raw_residual"):
    loss_lib.crd_inputs(u, p, "bogus")


@pytest.mark.parametrize(
    "h,out,sigma",
    [(8, 64, 4.0), (6, 48, 4.0), (36, 288, 4.0), (5, 20, 4.0), (3, 10, 4.0), (7, 50, 1.5)],
)
def test_anomaly_map_matches_scipy(h, out, sigma):
  """Upsampling then scipy.ndimage.gaussian_filter(mode='reflect', truncate 4)."""
  s = RNG.random(size=(2, h, h)).astype(np.float32)
  up = np_bilinear_up(s[..., None], out, out)[..., 0]
  ref = np.stack([scipy.ndimage.gaussian_filter(m, sigma=sigma) for m in up])
  got = anomaly_map.anomaly_map(jnp.asarray(s), (out, out), sigma)
  np.testing.assert_allclose(got, ref, atol=2e-6)


def test_image_score_modes():
  patch = jnp.asarray(RNG.random(size=(2, 4, 4)).astype(np.float32))
  maps = anomaly_map.anomaly_map(patch, (16, 16), 4.0)
  np.testing.assert_allclose(anomaly_map.image_score(patch, maps, "reference"), patch.max((1, 2)))
  np.testing.assert_allclose(anomaly_map.image_score(patch, maps, "paper"), maps.max((1, 2)))


@pytest.mark.parametrize(
    "c,pre,d,level,groups,div",
    [
        (512, 1536, 1536, 0, 8, 6),  # WideResNet50 level 2: means of 6 -> columns 0..767
        pytest.param(  # level 3: means of 12 -> columns 768..1535
            1024, 1536, 1536, 1, 16, 12, marks=pytest.mark.slow
        ),
        (40, 256, 256, 0, 1, None),  # EfficientNet-Lite0 (demo): uneven, overlapping windows
        (112, 256, 256, 1, 2, None),  # two blocks of 56 channels
        (32, 48, 48, 0, 1, 12),  # equal groups, fewer channels than a group holds
    ],
)
def test_the_pooling_convolution_equals_unfold_then_pool(c, pre, d, level, groups, div):
  """`pool_conv` (the "xla" form's one convolution per level) against the unfolded vector
  times the level's projection matrix, in float32 to 1e-6, in one group and in the groups
  float32 levels run in."""
  channels = [c, c] if level == 0 else [c // 2, c]
  m, c0, c1 = features.level_projections(channels, pre, d)[level]
  kernel, g, dv = features.pooling_kernel(m, c, 3, features.FLOAT32_GROUP_CHANNELS)
  assert (g, dv) == (groups, div)
  assert kernel.shape == (3, 3, c // g, c1 - c0)
  assert features.pooling_kernel(m, c)[1:] == (1, div)
  x = jnp.asarray(np.random.default_rng(c + pre).standard_normal((2, 5, 7, c)), jnp.float32)
  ref = np.asarray(features.unfold3x3(x), np.float64) @ m.astype(np.float64)
  got = jax.jit(lambda x: features.pool_conv(x, m))(x)
  np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=1e-6)
  if div is not None:  # bfloat16 levels: one group, read as they are, summed in float32
    xb = x.astype(jnp.bfloat16)
    got = jax.jit(lambda x: features.pool_conv(x, m, dtype=jnp.float32))(xb)
    ref = np.asarray(features.unfold3x3(xb.astype(jnp.float32)), np.float64) @ m.astype(np.float64)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=1e-6)


def test_the_pooling_convolution_reads_bfloat16_levels_exactly():
  """bfloat16 levels aggregated to float32 (`model.aggregate_dtype=float32`): the same sums as
  the levels cast to float32 first (0/1 weights, float32 accumulation), to float32 rounding."""
  rng = np.random.default_rng(5)
  levels = [
      jnp.asarray(rng.standard_normal(s), jnp.bfloat16) for s in [(2, 8, 8, 512), (2, 4, 4, 1024)]
  ]
  agg = jax.jit(lambda a, b: features.aggregate_patches([a, b], 1536, 1536, 3, "xla", jnp.float32))
  got = agg(*levels)
  assert got.dtype == jnp.float32
  ref = agg(*[f.astype(jnp.float32) for f in levels])
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=0, atol=1e-6)


@pytest.mark.slow  # compiles WideResNet50's aggregation at 288 px twice
def test_the_xla_aggregation_never_forms_the_k_by_k_stack():
  """The "xla" form (GPUs, TPUs) compiled on this CPU: no intermediate as large as a level's
  nine shifted copies, and less scratch memory than the unfold-then-pool program."""
  shapes = [(2, 36, 36, 512), (2, 18, 18, 1024)]  # WideResNet50's levels 2 and 3 at 288 px
  stack = 2 * 36 * 36 * 512 * 9

  def compiled(fn):
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    return jax.jit(lambda a, b: fn([a, b])).lower(*args).compile()

  def largest(c):
    dims = re.findall(r"f32\[([\d,]*)\]", c.as_text())
    return max(int(np.prod([int(d) for d in s.split(",") if d])) for s in dims)

  xla = compiled(lambda ls: features.aggregate_patches(ls, 1536, 1536, 3, "xla"))
  assert largest(xla) < stack
  assert largest(xla) <= 2 * 36 * 36 * 2 * 1536  # the two pooled levels side by side

  def unfold_then_pool(ls):
    pooled = [features.adaptive_avg_pool_last(features.unfold3x3(f), 1536) for f in ls]
    pooled[1] = features.resize_bilinear(pooled[1], (36, 36))
    x = jnp.stack(pooled, axis=-2).reshape(2, 36 * 36, 3072)
    return features.adaptive_avg_pool_last(x, 1536)

  before = compiled(unfold_then_pool)
  assert largest(before) >= stack  # the check can fail: the old program forms the stack
  assert xla.memory_analysis().temp_size_in_bytes < before.memory_analysis().temp_size_in_bytes
  levels = [
      np.random.default_rng(i).standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)
  ]
  out = jax.jit(lambda a, b: features.aggregate_patches([a, b], 1536, 1536, 3, "xla"))(*levels)
  ref = jax.jit(lambda a, b: unfold_then_pool([a, b]))(*levels)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=0, atol=1e-6)


@pytest.mark.slow  # compiles WideResNet50's aggregation at 288 px in two dtypes
def test_bfloat16_aggregation_sums_in_float32_and_writes_half_the_bytes():
  """`model.aggregate_dtype=compute` with bfloat16 levels: the "xla" aggregation writes t in
  bfloat16, its sums run in float32, so it is the float32 aggregation of the same bfloat16 levels rounded to
  bfloat16 (on average within 1.5 roundings)."""
  shapes = [(2, 36, 36, 512), (2, 18, 18, 1024)]
  rng = np.random.default_rng(3)
  levels = [jnp.asarray(rng.standard_normal(s), jnp.bfloat16) for s in shapes]

  def agg(a, b):
    return features.aggregate_patches([a, b], 1536, 1536, 3, "xla")

  low = jax.jit(agg)(*levels)
  assert low.dtype == jnp.bfloat16
  ref = jax.jit(agg)(*[f.astype(jnp.float32) for f in levels])
  err = np.abs(np.asarray(low, np.float32) - np.asarray(ref)).mean()
  rounded = np.abs(np.asarray(ref.astype(jnp.bfloat16), np.float32) - np.asarray(ref)).mean()
  assert err <= 1.5 * rounded  # measured 1.19: t rounded once more where level 3 is upsampled
  # t itself is half the bytes (XLA:CPU computes bfloat16 elementwise work in float32, so its
  # scratch does not shrink; the TPU compiler's does: docs/performance.md)
  low_c = jax.jit(agg).lower(*levels).compile().memory_analysis()
  ref_c = jax.jit(agg).lower(*[f.astype(jnp.float32) for f in levels]).compile()
  assert 2 * low_c.output_size_in_bytes == ref_c.memory_analysis().output_size_in_bytes
