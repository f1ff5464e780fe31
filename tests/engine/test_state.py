"""The training state: what it holds of the frozen backbone."""

import jax
import numpy as np
import pytest

from cras_jax import backbones
from cras_jax.configs import demo
from cras_jax.engine import steps


def _leaf_names(tree) -> set[str]:
  return {jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize(
    "backbone,levels,unused",
    [
        ("resnet18", (2, 3), ("layer4", "fc")),
        pytest.param(
            "resnet18", (1,), ("layer2", "layer3", "layer4", "fc"), marks=pytest.mark.slow
        ),
        pytest.param(
            "efficientnet_lite0",
            (2, 3),
            ("_blocks_15", "_conv_head", "_fc"),
            marks=pytest.mark.slow,
        ),
    ],
)
def test_the_state_holds_only_the_backbone_stages_the_levels_use(backbone, levels, unused):
  cfg = demo.get_config()
  cfg.data.crop = 64
  cfg.model.backbone = backbone
  cfg.model.levels = levels
  cfg.model.pre_embed_dim, cfg.model.embed_dim = 48, 32
  spec = steps.ModelSpec(cfg, 2)
  module = backbones.build_module(backbone)
  full = jax.jit(lambda r, x: module.init(r, x, with_logits=True))(
      jax.random.PRNGKey(0), np.zeros((1, 64, 64, 3), np.float32)
  )
  state = steps.create_state(spec, full, 0)
  kept, names = _leaf_names(state.backbone), _leaf_names(full)
  assert kept < names
  for name in unused:
    assert any(f"'{name}" in n for n in names) and not any(f"'{name}" in n for n in kept), name
  # The kept variables are the loaded ones, and they are all the features need (flax raises
  # for a missing variable).
  flat = dict(jax.tree_util.tree_leaves_with_path(full))
  for k, v in jax.tree_util.tree_leaves_with_path(state.backbone):
    assert v is flat[k]
  t = jax.eval_shape(spec.features, state.backbone, np.zeros((2, 64, 64, 3), np.uint8))
  assert t.shape == (2, spec.num_patches, 32)
