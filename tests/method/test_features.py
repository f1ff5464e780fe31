"""docs/method.md §2's patch aggregation against an independent PyTorch expression.

The reference follows the authors' code order: unfold 3x3 (zero padding 1), upsample level 3's
unfolded grid (every one of its C*9 components) to level 2's grid with bilinear
interpolation (align_corners=False) BEFORE any pooling, 1-D adaptive average pooling of each
level's C*9 vector to pre_embed, stack level-major, pool again to D.
`cras_jax.method.features.aggregate_patches` pools before upsampling; the two must agree.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch",
    reason="torch not installed: PyTorch feature reference "
    "skipped (pip install -r requirements-tools.txt)",
)
F = torch.nn.functional

from cras_jax.method.features import aggregate_patches  # noqa: E402


def torch_aggregate(levels_nchw, pre_embed: int, embed: int, k: int = 3) -> np.ndarray:
  """[B, C_l, H_l, W_l] per level -> [B, H0*W0, embed], the reference's way."""
  b = levels_nchw[0].shape[0]
  h0, w0 = levels_nchw[0].shape[-2:]
  per_level = []
  for feat in levels_nchw:
    _, c, h, w = feat.shape
    u = F.unfold(feat, kernel_size=k, padding=(k - 1) // 2)  # [B, C*k*k, h*w]
    u = u.reshape(b, c, k, k, h, w)
    if (h, w) != (h0, w0):  # upsample every component of the unfolded grid
      u = F.interpolate(
          u.reshape(-1, 1, h, w), size=(h0, w0), mode="bilinear", align_corners=False
      ).reshape(b, c, k, k, h0, w0)
    u = u.permute(0, 4, 5, 1, 2, 3).reshape(b * h0 * w0, 1, c * k * k)  # channel, row, col
    per_level.append(F.adaptive_avg_pool1d(u, pre_embed).squeeze(1))  # [N, pre]
  x = torch.stack(per_level, dim=1).reshape(b * h0 * w0, 1, -1)  # level-major
  return F.adaptive_avg_pool1d(x, embed).reshape(b, h0 * w0, embed).numpy()


CASES = {
    # uneven windows everywhere: 144/40, 288/40, 80/24
    "square": ([(2, 16, 12, 12), (2, 32, 6, 6)], 40, 24),
    # non-square, odd level-3 grid (ceil strides), windows crossing channel boundaries
    "non_square": ([(1, 8, 10, 7), (1, 12, 5, 4)], 30, 17),
    # three levels, level 3 not half of level 2
    "three_levels": ([(1, 6, 9, 11), (1, 10, 5, 6), (1, 14, 3, 3)], 21, 13),
    # the paper's shapes at batch 1: WRN50-2 layer2/layer3 at 288x288, D = 1536
    "paper": ([(1, 512, 36, 36), (1, 1024, 18, 18)], 1536, 1536),
    # equal groups of 3 and 6 taps crossing channels (144/48, 288/48), non-square grid
    "equal_groups": ([(2, 16, 8, 6), (2, 32, 4, 3)], 48, 24),
}


@pytest.mark.parametrize("form", ["cpu_tuned", "xla"])
@pytest.mark.parametrize("case", list(CASES))
def test_aggregate_patches_matches_torch(case, form):
  shapes, pre, d = CASES[case]
  rng = np.random.default_rng(len(case))
  levels = [rng.standard_normal(s).astype(np.float32) for s in shapes]
  ref = torch_aggregate([torch.from_numpy(x) for x in levels], pre, d)
  levels_nhwc = [x.transpose(0, 2, 3, 1) for x in levels]
  out = np.asarray(aggregate_patches(levels_nhwc, pre, d, form=form))
  assert out.shape == ref.shape == (shapes[0][0], shapes[0][2] * shapes[0][3], d)
  np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)
