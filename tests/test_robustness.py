"""Robustness perturbations (docs/method.md §11, Table 7) against independent references
(torchvision, SciPy), their seeding, and the CLI on the tiny trained run."""

import json
import os
import signal

import numpy as np
import pytest
import scipy.ndimage as ndi

from cras_jax.data import perturbations as R
from cras_jax.experiments import robustness as robustness_cmd
from tests.conftest import run_command

torch = pytest.importorskip("torch")
TF = pytest.importorskip("torchvision.transforms.functional")
from torchvision.transforms import InterpolationMode  # noqa: E402


def _images(n=3, h=40, w=36, seed=0):
  rng = np.random.default_rng(seed)
  img = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
  img[0, :8] = 255  # saturated
  img[0, 8:16] = img[0, 8:16, :, :1]  # greys (max == min: hue undefined)
  img[-1, :6] = 0  # black
  return img


def _torch(img):
  return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)


def _numpy(t):
  return t.permute(1, 2, 0).numpy()


def _close(out, ref):
  d = np.abs(out.astype(int) - ref.astype(int))
  assert d.max() <= 1 and (d > 0).mean() < 1e-3, (d.max(), (d > 0).mean())


@pytest.mark.parametrize(
    "ours,theirs,factors",
    [
        (R.adjust_brightness, TF.adjust_brightness, (0.9, 0.97, 1.04, 1.1)),
        (R.adjust_contrast, TF.adjust_contrast, (0.9, 0.95, 1.07, 1.1)),
        (R.adjust_saturation, TF.adjust_saturation, (0.9, 0.93, 1.02, 1.1)),
        (R.adjust_hue, TF.adjust_hue, (-0.1, -0.03, 0.05, 0.1)),
    ],
)
def test_colour_ops_match_torchvision(ours, theirs, factors):
  for img in _images():
    for f in factors:
      _close(ours(img, f), _numpy(theirs(_torch(img), f)))


def test_color_jitter_is_torchvision_colorjitter_for_its_parameters():
  s = R.Settings()
  seen_orders = set()
  for i, img in enumerate(_images(4)):
    params = R.jitter_params(R.image_rng(0, "jitter", i), s)
    order, b, c, sat, h = params
    assert sorted(order.tolist()) == [0, 1, 2, 3]
    assert all(0.9 <= v <= 1.1 for v in (b, c, sat)) and -0.1 <= h <= 0.1
    seen_orders.add(tuple(order.tolist()))
    ref = _torch(img)
    for k in order:  # torchvision ColorJitter.forward, the same factors and order
      ref = [
          lambda x: TF.adjust_brightness(x, b),
          lambda x: TF.adjust_contrast(x, c),
          lambda x: TF.adjust_saturation(x, sat),
          lambda x: TF.adjust_hue(x, h),
      ][k](ref)
    out = R.color_jitter(img, params)
    _close(out, _numpy(ref))
    assert np.any(out != img)
  assert len(seen_orders) > 1  # the order is random


@pytest.mark.parametrize("fill,mode", [("reflect", "reflect"), ("nearest", "nearest")])
def test_rotation_matches_scipy(fill, mode):
  img = _images(1)[0]
  mask = (np.random.default_rng(1).random(img.shape[:2]) > 0.7).astype(np.uint8)
  for angle in (-4.6, 2.3, 5.0):
    out, m = R.rotate(img, mask, angle, fill)
    ref = np.stack(
        [
            ndi.rotate(img[..., c].astype(float), angle, reshape=False, order=1, mode=mode)
            for c in range(3)
        ],
        -1,
    )
    assert np.abs(out - ref).max() <= 0.5 + 1e-6  # ours is the same bilinear value, rounded
    np.testing.assert_array_equal(m, ndi.rotate(mask, angle, reshape=False, order=0, mode=mode))


def test_rotation_constant_fill_matches_torchvision_rotate():
  img = _images(1)[0]
  mask = (np.random.default_rng(2).random(img.shape[:2]) > 0.7).astype(np.uint8)
  for angle in (-3.3, 4.1):
    out, m = R.rotate(img, mask, angle, "constant")
    ref = _numpy(TF.rotate(_torch(img), angle, interpolation=InterpolationMode.BILINEAR, fill=0))
    _close(out[3:-3, 3:-3], ref[3:-3, 3:-3])  # borders: torchvision blends the fill differently
    ref_m = TF.rotate(torch.from_numpy(mask)[None], angle, interpolation=InterpolationMode.NEAREST)[
        0
    ].numpy()
    assert (m != ref_m).mean() < 1e-3
    assert out[0, 0].max() == 0 and out[-1, -1].max() == 0  # black corners


def test_masks_rotate_with_images():
  mask = np.zeros((64, 64), np.uint8)
  mask[10:30, 36:50] = 1
  img = np.repeat(mask[..., None] * 255, 3, axis=-1).astype(np.uint8)
  for seed in range(3):
    out, m = R.perturb(img, mask, 5, "rotation", seed)
    assert not np.array_equal(m, mask)  # it really rotated
    agree = ((out[..., 0] >= 128) == (m == 1)).mean()
    assert agree > 0.99, agree
  for kind in ("noise", "jitter"):  # these leave the ground truth alone
    _, m = R.perturb(img, mask, 5, kind, 0)
    np.testing.assert_array_equal(m, mask)


def test_zero_strength_is_identity():
  zero = R.Settings(noise_std=0, brightness=0, contrast=0, saturation=0, hue=0, max_angle=0)
  mask = np.zeros((40, 36), np.uint8)
  mask[5:9, 5:20] = 1
  for img in _images():
    for kind in R.PERTURBATIONS:
      out, m = R.perturb(img, mask, 3, kind, 0, zero)
      np.testing.assert_array_equal(out, img)
      np.testing.assert_array_equal(m, mask)


def test_each_perturbation_changes_the_image_only_as_claimed():
  img = _images(1)[0]
  mask = np.zeros(img.shape[:2], np.uint8)
  mask[4:12, 4:12] = 1
  only_jitter = R.Settings(noise_std=0, max_angle=0)
  out, _ = R.perturb(img, mask, 0, "noise", 0, only_jitter)
  np.testing.assert_array_equal(out, img)
  out, _ = R.perturb(img, mask, 0, "jitter", 0, only_jitter)
  assert np.any(out != img)
  # One op at a time: only brightness keeps the hue and scales every channel alike.
  b_only = R.Settings(contrast=0, saturation=0, hue=0)
  _, b, *_ = R.jitter_params(R.image_rng(0, "jitter", 0), b_only)
  out, _ = R.perturb(img, mask, 0, "jitter", 0, b_only)
  np.testing.assert_array_equal(out, R.adjust_brightness(img, b))


def test_noise_statistics_reproducibility_and_seeding():
  img = np.full((128, 128, 3), 128, np.uint8)
  out = R.gaussian_noise(img, np.random.default_rng(0), 0.01)
  d = (out.astype(float) - img) / 255.0
  assert abs(d.mean()) < 3e-4
  # Rounding to uint8 adds (1/255)^2/12 of variance.
  assert abs(d.std() - np.sqrt(0.01**2 + (1 / 255) ** 2 / 12)) < 3e-4
  assert (
      abs(R.gaussian_noise(img, np.random.default_rng(0), 0.05).astype(float).std() / 255 - 0.05)
      < 2e-3
  )  # std configurable
  a = R.perturb(img, None, 4, "noise", 0)[0]
  np.testing.assert_array_equal(a, R.perturb(img, None, 4, "noise", 0)[0])  # reproducible
  assert np.any(a != R.perturb(img, None, 4, "noise", 1)[0])  # seed matters
  assert np.any(a != R.perturb(img, None, 5, "noise", 0)[0])  # per image


class _Source:
  """A stand-in data source (len, [i], __getitems__) of examples like the loader's."""

  def __init__(self, n=7):
    imgs = _images(n, 24, 24, seed=3)
    self.examples = [
        {
            "image": imgs[i],
            "mask": (imgs[i, ..., 0] > 200).astype(np.uint8),
            "label": i % 2,
            "is_anomaly": 1,
            "defect_type": b"x",
            "name": f"c/test/x/{i:03d}.png".encode(),
        }
        for i in range(n)
    ]
    self.split = "test"

  def __len__(self):
    return len(self.examples)

  def __getitem__(self, i):
    return self.examples[i]

  def __getitems__(self, idx):
    return [self.examples[i] for i in idx]


@pytest.mark.parametrize("kind", R.PERTURBATIONS)
def test_perturbed_source_is_independent_of_batch_size(kind):
  from cras_jax.data import mvtec

  src = _Source()
  p = R.PerturbedSource(src, kind, seed=3)
  assert len(p) == len(src) and p.split == "test"
  whole = mvtec.get_batch(p, np.arange(7))
  parts = [mvtec.get_batch(p, idx) for idx in (np.arange(0, 3), np.arange(3, 6), [6])]
  for key in ("image", "mask", "label", "is_anomaly"):
    np.testing.assert_array_equal(whole[key], np.concatenate([b[key] for b in parts]))
  assert whole["name"] == [f"c/test/x/{i:03d}.png" for i in range(7)]
  clean = mvtec.get_batch(src, np.arange(7))
  np.testing.assert_array_equal(whole["label"], clean["label"])
  assert np.any(whole["image"] != clean["image"])
  assert np.any(whole["mask"] != clean["mask"]) == (kind == "rotation")
  for i in range(7):  # each example perturbed alone, keyed by its position in the split
    img, mask = R.perturb(clean["image"][i], clean["mask"][i], i, kind, 3)
    np.testing.assert_array_equal(img, whole["image"][i])
    np.testing.assert_array_equal(mask, whole["mask"][i])


def test_robustness_cli_on_tiny_run(tiny_run, capsys):
  """The command as `python -m cras_jax.robustness` runs it (its flags and main), in this
  process: the tiny run's compiled scoring is shared."""
  workdir = tiny_run["workdir"]
  run_command(robustness_cmd, f"--workdir={workdir}", "--seed=1")
  out = capsys.readouterr().out
  stem = os.path.join(workdir, "results", "robustness_seed1")
  for ext in ("json", "csv", "md"):
    assert os.path.isfile(f"{stem}.{ext}")
  with open(f"{stem}.json") as f:
    res = json.load(f)
  assert res["step"] == 9 and "checkpoint step 9 (final epoch)" in res["protocol"]
  assert list(res["tables"]) == ["clean", *R.PERTURBATIONS]
  classes = ["chip", "fabric", "gear", "granite", "mean"]
  for p in R.PERTURBATIONS:
    assert list(res["tables"][p]) == classes and list(res["drops"][p]) == classes
    for m in ("i_auroc", "p_auroc"):
      expect = 100 * (res["tables"]["clean"]["mean"][m] - res["tables"][p]["mean"][m])
      assert res["drops"][p]["mean"][m] == pytest.approx(expect)
    assert any(abs(d) > 0 for d in res["drops"][p]["mean"].values()), p
  with open(f"{stem}.md") as f:
    md = f.read()
  for row in ("| clean |", "| noise |", "| jitter |", "| rotation |", "| mean drop |"):
    assert row in md and row in out
  with open(f"{stem}.csv") as f:
    rows = f.read().splitlines()
  assert rows[0] == "setting,class,metric,value_pts,drop_pts"
  assert len(rows) == 1 + 4 * 5 * 6  # settings x (classes + mean) x metrics


def test_a_stop_request_ends_robustness_with_143_and_writes_nothing(
    tiny_run, tmp_path, monkeypatch
):
  from absl import flags

  from cras_jax.base import stop
  from cras_jax.experiments import robustness

  monkeypatch.setattr(stop, "requested", lambda: signal.SIGTERM)  # as if SIGTERM had come
  fv = flags.FlagValues()
  robustness.define_flags(fv)
  fv(["robustness", f"--workdir={tiny_run['workdir']}", f"--output_dir={tmp_path / 'out'}"])
  with pytest.raises(SystemExit) as e:
    robustness.main(["robustness"], fv)
  assert e.value.code == 128 + signal.SIGTERM
  assert not (tmp_path / "out").exists()
