"""The determinism switch (cras_jax/engine/determinism.py)."""

import os

import jax
import jax.numpy as jnp
import numpy as np

from cras_jax.engine import determinism, sharding


def test_deterministic_train_jit_is_the_same_program_on_cpu():
  devices = sharding.Devices(jax.devices()[:1])

  def step(state, batch):
    g = jax.grad(lambda w: jnp.sum(jnp.tanh(batch["x"] @ w)))(state)
    return state - 0.1 * g, {"norm": jnp.linalg.norm(g)}

  state = jnp.ones((4, 3))
  batch = {"x": jnp.asarray(np.random.default_rng(0).standard_normal((8, 4)), jnp.float32)}
  texts = []
  for det in (False, True):
    compiled = devices.jit_train(step, deterministic=det).lower(state, batch).compile()
    texts.append(compiled.as_text())
  strip = lambda t: "\n".join(l for l in t.splitlines() if not l.startswith("HloModule"))
  assert strip(texts[0]) == strip(texts[1])


def test_xla_flag_only_before_the_backends_start(monkeypatch, capsys):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  assert not determinism.use_xla_flag(False)
  jax.devices()  # the backends have started in this process
  assert not determinism.use_xla_flag(True)
  assert "only the training step" in capsys.readouterr().err
  monkeypatch.setattr(determinism.xla_bridge, "backends_are_initialized", lambda: False)
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
  assert determinism.use_xla_flag(True)
  assert os.environ["XLA_FLAGS"].split() == [
      "--xla_cpu_enable_fast_math=false",
      determinism.FLAG,
  ]
  assert determinism.use_xla_flag(True)  # already there: unchanged
  assert os.environ["XLA_FLAGS"].count("deterministic") == 1
