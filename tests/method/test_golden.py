"""Every stage against vectors recorded from the authors' PyTorch code."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cras_jax.engine import model
from cras_jax.engine.steps import make_optimizer
from cras_jax.method import anomaly_map, features, matching
from cras_jax.method import centres as centres_lib
from tests import golden

G = golden.load()
N, SIZE, K, PRE, D, SIGMA, BETA = G["config"]
N, SIZE, K, PRE, D = int(N), int(SIZE), int(K), int(PRE), int(D)
CFG = model.HeadsConfig(embed_dim=D, noise_sigma=float(SIGMA), dafs_beta=float(BETA))


def test_features_t():
  t = features.aggregate_patches(
      [golden.nhwc(G["level2_nchw"]), golden.nhwc(G["level3_nchw"])], PRE, D
  )
  np.testing.assert_allclose(t, G["features_t"], atol=2e-6, rtol=1e-5)


def test_adapter_and_centres():
  params, _ = golden.heads_variables(G)
  u = model.adapt(params, jnp.asarray(G["features_t"]), CFG)
  np.testing.assert_allclose(u, G["features_u_init"], atol=2e-6, rtol=1e-5)
  sums, counts = jnp.zeros((K, u.shape[1], D)), jnp.zeros((K,))  # as train.feature_pass starts
  sums, counts = centres_lib.accumulate(sums, counts, u, jnp.asarray(G["labels"]))
  np.testing.assert_allclose(centres_lib.finalise(sums, counts), G["centres"], atol=2e-6)


def test_training_matching_and_dafs_inputs():
  u = jnp.asarray(G["features_u_init"])
  _, p = matching.match_known(u, jnp.asarray(G["centres"]), jnp.asarray(G["labels"]))
  np.testing.assert_allclose(jnp.concatenate([u, u - p], -1), G["train_disc_input_true"], atol=2e-6)
  from cras_jax.method import synthesis

  v = synthesis.dafs(u, p, jnp.asarray(G["noise"]), float(BETA))
  np.testing.assert_allclose(jnp.concatenate([v, v - p], -1), G["train_disc_input_fake"], atol=2e-6)


def _one_step():
  params, stats = golden.heads_variables(G)
  params = jax.tree.map(jnp.asarray, params)
  tx = make_optimizer(lr_adapter=1e-4, wd_adapter=0.01, lr_disc=2e-4, wd_disc=1e-5)
  opt_state = tx.init(params)
  grad_fn = jax.jit(jax.value_and_grad(model.heads_loss, has_aux=True), static_argnums=6)
  (loss, aux), grads = grad_fn(
      params,
      stats,
      jnp.asarray(G["features_t"]),
      jnp.asarray(G["labels"]),
      jnp.asarray(G["centres"]),
      jnp.asarray(G["noise"]),
      CFG,
  )
  updates, _ = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), aux


def test_one_training_step():
  new_params, aux = _one_step()
  m = aux["metrics"]
  np.testing.assert_allclose(m["loss_true"], G["train_loss_true"], rtol=1e-5)
  np.testing.assert_allclose(m["loss_fake"], G["train_loss_fake"], rtol=1e-5)
  ref_params, ref_stats = golden.heads_variables(G, "adapter_step1", "disc_step1")
  # Biases with zero gradient in exact arithmetic (adapter bias, Linear biases
  # before BatchNorm) move by Adam-amplified rounding noise: tolerance 2 lr.
  loose = {
      ("adapter", "fc0", "bias"): 2e-4,
      ("disc", "block1_fc", "bias"): 4e-4,
      ("disc", "block2_fc", "bias"): 4e-4,
  }
  flat_new = {
      tuple(k.key for k in path): v for path, v in jax.tree_util.tree_leaves_with_path(new_params)
  }
  flat_ref = {
      tuple(k.key for k in path): v for path, v in jax.tree_util.tree_leaves_with_path(ref_params)
  }
  assert flat_new.keys() == flat_ref.keys()
  for key, ref in flat_ref.items():
    np.testing.assert_allclose(flat_new[key], ref, atol=loose.get(key, 2e-7), err_msg=str(key))
  stats = aux["batch_stats"]["disc"]
  for name in ("block1_bn", "block2_bn"):
    for s in ("mean", "var"):
      np.testing.assert_allclose(
          stats[name][s], ref_stats["disc"][name][s], atol=1e-6, err_msg=f"{name}.{s}"
      )


def _scoring(per_image, prepared=False):
  cfg = model.HeadsConfig(embed_dim=D, per_image_matching=per_image)
  params, stats = golden.heads_variables(G, "adapter_step1", "disc_step1")
  u = jnp.asarray(G["test_features_u"])
  if prepared:
    # The fast inference path: BatchNorm folded into the Linear layers and the
    # centre term of the first layer computed once per centre vector. The adapter
    # is replaced by the identity so that it is fed the recorded u.
    prep = model.prepare_scoring(params, stats, jnp.asarray(G["centres"]), cfg)
    prep["adapter"] = {"fc0": {"kernel": jnp.eye(D), "bias": jnp.zeros((D,))}}
    out = model.score_prepared(prep, u, (8, 8), (SIZE, SIZE), cfg)
    return out["cls"], out["scores"], out["maps"]
  k, _, p = matching.match_infer(u, jnp.asarray(G["centres"]), True, per_image)
  y = jnp.concatenate([u, u - p], -1)
  logits = cfg.discriminator.apply(
      {"params": params["disc"], "batch_stats": stats["disc"]}, y, train=False
  )
  patch = jax.nn.sigmoid(logits).reshape(-1, 8, 8)
  maps = anomaly_map.anomaly_map(patch, (SIZE, SIZE), 4.0)
  return k, anomaly_map.image_score(patch, maps, "reference"), maps


@pytest.mark.parametrize("prepared", [False, True])
def test_global_matching_per_image(prepared):
  k, _, _ = _scoring(per_image=True, prepared=prepared)
  np.testing.assert_array_equal(k, G["test_global_class_per_image"])


@pytest.mark.parametrize("prepared", [False, True])
def test_scores_and_maps_batch_mode(prepared):
  k, scores, maps = _scoring(per_image=False, prepared=prepared)
  np.testing.assert_array_equal(k, [1, 1, 1, 1])
  np.testing.assert_allclose(scores, G["test_image_scores"], atol=1e-6)
  np.testing.assert_allclose(maps, G["test_maps"], atol=1e-6)


@pytest.mark.parametrize("prepared", [False, True])
def test_scores_per_image_agree_where_class_agrees(prepared):
  _, scores, maps = _scoring(per_image=True, prepared=prepared)
  scores, maps = np.asarray(scores), np.asarray(maps)
  same = [0, 2, 3]
  np.testing.assert_allclose(scores[same], G["test_image_scores"][same], atol=1e-6)
  np.testing.assert_allclose(maps[same], G["test_maps"][same], atol=1e-6)
  assert abs(float(scores[1]) - float(G["test_image_scores"][1])) > 1e-6
