"""The heatmap renderer and the choice of which test images get heatmaps."""

import numpy as np

from cras_jax.results import render


def test_overlay_blends_the_ends_of_the_jet_scale_and_outlines_the_mask():
  image = np.full((6, 6, 3), 100, np.uint8)
  amap = np.zeros((6, 6), np.float32)
  amap[:, 3:] = 5.0  # above hi: the top colour; 0 = lo: the bottom colour
  mask = np.zeros((6, 6), bool)
  mask[1:5, 1:5] = True
  out = render.overlay(image, amap, lo=0.0, hi=2.0, alpha=0.25, mask=mask)
  # "jet" runs from dark blue (0, 0, 0.5) to dark red (0.5, 0, 0)
  blue = np.round(0.75 * 100 + 0.25 * np.array([0, 0, 127.5]))
  red = np.round(0.75 * 100 + 0.25 * np.array([127.5, 0, 0]))
  np.testing.assert_array_equal(out[0, 0], blue)
  np.testing.assert_array_equal(out[0, 5], red)
  ring = mask.copy()
  ring[2:4, 2:4] = False  # the 4 x 4 square's boundary: 12 pixels
  assert ring.sum() == 12
  np.testing.assert_array_equal(render.outline(mask), ring)
  assert (out[ring] == 255).all() and (out[2:4, 2] == blue).all()


def test_panel_is_image_mask_and_overlay_side_by_side():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
  mask = np.zeros((4, 4), np.uint8)
  mask[0, 0] = 1  # at half the size: resized (nearest) to the image's top-left 2 x 2
  amap = rng.random((8, 8), np.float32)
  panel = render.panel(image, mask, amap, 0.0, 1.0)
  assert panel.shape == (8, 24, 3) and panel.dtype == np.uint8
  np.testing.assert_array_equal(panel[:, :8], image)
  gt = np.zeros((8, 8), np.uint8)
  gt[:2, :2] = 255
  np.testing.assert_array_equal(panel[:, 8:16], np.repeat(gt[..., None], 3, -1))
  want = np.floor(0.5 * image + 0.5 * render.colours(amap, 0.0, 1.0))
  np.testing.assert_array_equal(panel[:, 16:], want.astype(np.uint8))


def test_heatmap_choice_takes_defective_images_first_and_one_normal():
  res = {
      "label": np.array([0, 0, 0, 0, 2, 2]),
      "is_anomaly": np.array([0, 1, 0, 1, 0, 1]),
      "maps": np.arange(6 * 4, dtype=np.float32).reshape(6, 2, 2),
  }
  names = ["a", "b", "c"]  # b has no test images
  chosen = render.heatmap_choice(res, names, per_class=2)
  assert [(k, idx) for k, idx, _, _ in chosen] == [(0, [1, 0]), (2, [5, 4])]
  assert chosen[0][2:] == (0.0, 15.0) and chosen[1][2:] == (16.0, 23.0)  # each class's range
  assert [idx for _, idx, _, _ in render.heatmap_choice(res, names, 3)] == [[1, 3, 0], [5, 4]]
  only = render.heatmap_choice(res, names, 3, with_normal=False)
  assert [idx for _, idx, _, _ in only] == [[1, 3, 0], [5, 4]]
  assert [idx for _, idx, _, _ in render.heatmap_choice(res, names, 1, False)] == [[1], [5]]
  assert [idx for _, idx, _, _ in render.heatmap_choice(res, names, 1)] == [[1, 0], [5, 4]]
