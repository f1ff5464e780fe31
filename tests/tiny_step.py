"""The tiny model, state and batch that the device and process tests step.

Imported by the scripts those tests run in subprocesses (after any
`jax.distributed.initialize`), so every run builds exactly the same inputs.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np

from cras_jax import backbones
from cras_jax.configs import demo
from cras_jax.engine import sharding, steps
from cras_jax.perf import rows


def setup(backbone: str | None = None):
  """-> (spec, devices, replicated state with random centres, global host batch of 8);
  `backbone`: another than the demo's (a smaller one where only the heads are stepped)."""
  cfg = demo.get_config()
  cfg.model.backbone = backbone or cfg.model.backbone
  cfg.data.crop = 64
  cfg.model.pre_embed_dim = 48
  cfg.model.embed_dim = 32
  spec = steps.ModelSpec(cfg, 3)
  devices = sharding.Devices()
  bb = backbones.load_variables(cfg.model.backbone, "random", 64, 0)
  state = steps.create_state(spec, bb, 0)
  rng = np.random.default_rng(0)
  state = state.replace(centres=jnp.asarray(rng.normal(size=state.centres.shape), jnp.float32))
  state = devices.put_replicated(jax.device_get(state))
  batch = {
      "image": rng.integers(0, 255, (8, 64, 64, 3), dtype=np.uint8),
      "label": np.array([0, 1, 2, 0, 1, 2, 0, 1], np.int32),
  }
  return spec, devices, state, batch


def compile_config():
  """The tiny model (64 px, D 32, pre 48) as the compile-only TPU and GPU tests compile it:
  float32, kernels "xla" (what "auto" gives on an accelerator)."""
  args = types.SimpleNamespace(
      backbone=None, embed_dim=32, pre_embed_dim=48, levels=None, weights="random"
  )
  config = rows.configure(demo.get_config(), args, 64, "float32")
  config.model.kernels = "xla"
  return config
