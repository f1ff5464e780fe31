"""The experiment switches of the paper's ablations and settings (docs/method.md §4-7, §10, §11):
each changes exactly what it claims."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cras_jax import backbones
from cras_jax import data as data_lib
from cras_jax.configs import demo
from cras_jax.engine import model, steps
from cras_jax.method import centres as centres_lib
from cras_jax.method import matching, synthesis
from cras_jax.runs import trained
from cras_jax.runs import workdir as runs
from cras_jax.scoring import evaluate
from cras_jax.training import train
from tests.conftest import TINY, run_module

RNG = np.random.default_rng(0)


def test_centre_weights_single_takes_first_image_of_each_class():
  labels = np.array([2, 0, 0, 1, 2, 1, 0])
  np.testing.assert_array_equal(centres_lib.centre_weights(labels, "mean"), np.ones(7))
  np.testing.assert_array_equal(centres_lib.centre_weights(labels, "single"), [1, 1, 0, 1, 0, 0, 0])
  with pytest.raises(ValueError, match="config.model.centre"):
    centres_lib.centre_weights(labels, "median")


def test_without_dafs_alpha_is_one_and_noise_is_added_unscaled():
  u, p = RNG.normal(size=(2, 2, 5, 4)).astype(np.float32)
  g = 0.1 * RNG.normal(size=(2, 5, 4)).astype(np.float32)
  np.testing.assert_array_equal(synthesis.dafs_alpha(u, p, g, 0.3, "none"), np.ones((2, 5)))
  np.testing.assert_allclose(synthesis.dafs(jnp.asarray(u), p, g, 0.3, "none"), u + g, atol=0)
  # beta 0 (Table 6) is the same ablation reached through the default formula.
  np.testing.assert_allclose(synthesis.dafs_alpha(u, p, g, 0.0), np.ones((2, 5)), rtol=1e-6)
  # The default variant does scale: alpha differs from 1 on random inputs.
  assert np.abs(np.asarray(synthesis.dafs_alpha(u, p, g, 0.3)) - 1).max() > 1e-3


def test_without_hpi_matched_index_is_the_patch_position():
  u = jnp.asarray(RNG.normal(size=(3, 6, 4)), jnp.float32)
  c = jnp.asarray(RNG.normal(size=(2, 6, 4)), jnp.float32)
  idx, p = matching.match_known(u, c, jnp.array([0, 1, 1]), hpi=False)
  np.testing.assert_array_equal(idx, np.tile(np.arange(6), (3, 1)))
  np.testing.assert_array_equal(p, np.asarray(c)[[0, 1, 1]])
  idx_hpi, _ = matching.match_known(u, c, jnp.array([0, 1, 1]), hpi=True)
  assert not np.array_equal(idx_hpi, idx)  # the local search moves some patches


@pytest.mark.parametrize(
    "mode,dim",
    [("raw_residual", 8), ("raw", 4), ("residual", 4), ("raw_raw", 8), ("residual_residual", 8)],
)
def test_crd_modes_set_discriminator_input(mode, dim):
  cfg = model.HeadsConfig(embed_dim=4, crd_input=mode)
  assert cfg.disc_input_dim == dim
  params, _ = model.init_heads(cfg, jax.random.PRNGKey(0))
  assert params["disc"]["block1_fc"]["kernel"].shape[0] == dim


@pytest.mark.parametrize(
    "levels",
    [
        pytest.param((1,), marks=pytest.mark.slow),
        (2, 3),
        (3, 4),
        pytest.param((1, 2, 3, 4), marks=pytest.mark.slow),
    ],
)
def test_any_subset_of_levels_builds_the_patch_grid_of_its_first_level(levels):
  cfg = demo.get_config()
  cfg.data.crop = 64
  cfg.model.backbone = "resnet18"  # the grid depends on the levels' strides, not the depth
  cfg.model.levels = levels
  cfg.model.pre_embed_dim, cfg.model.embed_dim = 48, 32
  spec = steps.ModelSpec(cfg, 2)
  stride = {1: 4, 2: 8, 3: 16, 4: 32}[levels[0]]
  assert spec.grid == (64 // stride, 64 // stride)
  bb = backbones.load_variables("resnet18", "random", 64, 0)
  t = spec.features(bb, np.zeros((1, 64, 64, 3), np.uint8))
  assert t.shape == (1, spec.num_patches, 32)


def _tiny_config(tiny_run):
  cfg = demo.get_config()
  for arg in TINY:
    key, value = arg[len("--config.") :].split("=")
    node = cfg
    *path, leaf = key.split(".")
    for k in path:
      node = node[k]
    node[leaf] = type(node[leaf])(value)
  cfg.data.root = str(tiny_run["data_root"])
  cfg.data.cache_dir = str(tiny_run["cache_dir"])
  cfg.train.cache_features = False
  return cfg


@pytest.mark.slow
def test_single_centre_is_the_first_training_image_of_each_class(tiny_run, tmp_path):
  cfg = _tiny_config(tiny_run)
  cfg.model.centre = "single"
  dataset, spec, devices, state = runs.open_for_training(cfg, str(tmp_path))
  acc, _ = train.feature_pass(state, spec, devices, dataset, cfg, str(tmp_path))
  single = np.asarray(train.compute_centres(state, acc, dataset, cfg).centres)
  labels = data_lib.class_indices(dataset.train)
  first = [int(np.flatnonzero(labels == k)[0]) for k in range(len(dataset.class_names))]
  images = data_lib.get_batch(dataset.train, np.array(first), ("image",))["image"]
  u = model.adapt(state.params, spec.features(state.backbone, images), spec.heads)
  np.testing.assert_allclose(single, np.asarray(u), rtol=1e-5, atol=1e-5)
  # The default averages all images of a class: a different centre.
  cfg.model.centre = "mean"
  acc, _ = train.feature_pass(state, spec, devices, dataset, cfg, str(tmp_path))
  mean = np.asarray(train.compute_centres(state, acc, dataset, cfg).centres)
  assert np.abs(mean - single).max() > 1e-3


def _main(workdir, tiny_run, *extra):
  return run_module(
      "cras_jax.main",
      "--config=configs/demo.py",
      f"--workdir={workdir}",
      f"--config.data.root={tiny_run['data_root']}",
      f"--config.data.cache_dir={tiny_run['cache_dir']}",
      *TINY,
      "--config.eval.num_heatmaps=0",
      *extra,
  )


@pytest.mark.slow
def test_best_epoch_protocol_reports_the_best_test_epoch_and_says_so(tiny_run, tmp_path):
  work = tmp_path / "best"
  out = _main(work, tiny_run, "--config.train.epochs=3", "--config.eval.protocol=best_epoch")
  res = work / "results"
  epochs = [json.load(open(res / f"metrics_epoch_{e:03d}.json")) for e in (1, 2, 3)]
  sums = [e["metrics"]["mean"]["i_auroc"] + e["metrics"]["mean"]["p_auroc"] for e in epochs]
  best = int(np.argmax(sums))  # first of ties, as the reference
  final = json.load(open(res / "metrics_final.json"))
  assert final["protocol"] == evaluate.BEST_EPOCH_LABEL and "selected on the test set" in out
  assert final["selected"] == f"epoch_{best + 1:03d}" and final["step"] == 3 * (best + 1)
  assert final["metrics"] == epochs[best]["metrics"]
  assert (
      open(res / "metrics_final.md").read().startswith(f"protocol: {evaluate.BEST_EPOCH_LABEL}\n")
  )


@pytest.mark.slow
def test_single_class_setting_trains_one_model_per_class_into_one_table(tiny_run, tmp_path):
  work = tmp_path / "single"
  _main(
      work,
      tiny_run,
      "--config.train.epochs=1",
      "--config.setting=single_class",
      "--config.data.classes=('chip','gear')",
  )
  final = json.load(open(work / "results" / "metrics_final.json"))
  assert final["setting"] == "single_class"
  assert list(final["metrics"]) == ["chip", "gear", "mean"]
  for cls in ("chip", "gear"):
    sub = json.load(open(work / "classes" / cls / "results" / "metrics_final.json"))
    assert list(sub["metrics"]) == [cls, "mean"]  # a model that saw one class
    assert sub["metrics"][cls] == final["metrics"][cls]
    assert final["step"][cls] == 1  # 6 training images, batch 8: one step per epoch
  assert final["metrics"]["mean"]["i_auroc"] == pytest.approx(
      np.mean([final["metrics"][c]["i_auroc"] for c in ("chip", "gear")])
  )
  # Evaluation of the finished setting gathers the per-class checkpoints again.
  _main(
      work,
      tiny_run,
      "--config.setting=single_class",
      "--config.train.epochs=1",
      "--config.data.classes=('chip','gear')",
      "--mode=eval",
  )
  ev = json.load(open(work / "results" / "metrics_eval.json"))
  for cls in ("chip", "gear"):
    assert ev["metrics"][cls]["i_auroc"] == pytest.approx(final["metrics"][cls]["i_auroc"])
  # Scoring tools need one of the per-class models and say so.
  with pytest.raises(FileNotFoundError, match="one model per class"):
    trained.load_run(str(work))
  assert trained.load_run(str(work / "classes" / "gear")).class_names == ["gear"]
