"""The jitted steps compile once: after the first call, new batches of the same shape (and the
state a training step returns) reuse the compiled executable; a Scorer builds its predict and
prepare steps once and reuses them for every batch and every new state.

Two independent signals: jax.monitoring events of the compile pipeline (tracing, lowering,
XLA backend compiles, persistent-cache hits and misses, all under '/jax/core/compile/' or
'/jax/compilation_cache/'), and, where the jitted function has it, `_cache_size()`.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cras_jax import backbones
from cras_jax.configs import demo
from cras_jax.engine import sharding, steps
from cras_jax.scoring import scoring

SIZE, K, B = 64, 3, 4
COMPILE_EVENTS = ("/jax/core/compile/", "/jax/compilation_cache/cache_")


@contextlib.contextmanager
def compile_events():
  """Collects the names of compile-pipeline monitoring events raised inside the block."""
  seen: list[str] = []

  def on_duration(name, _secs, **_):
    if name.startswith(COMPILE_EVENTS):
      seen.append(name)

  def on_event(name, **_):
    if name.startswith(COMPILE_EVENTS):
      seen.append(name)

  jax.monitoring.register_event_duration_secs_listener(on_duration)
  jax.monitoring.register_event_listener(on_event)
  try:
    yield seen
  finally:
    jax.monitoring.unregister_event_duration_listener(on_duration)
    jax.monitoring.unregister_event_listener(on_event)


def cache_size(fn):
  return fn._cache_size() if hasattr(fn, "_cache_size") else None


@pytest.fixture(scope="module")
def setup():
  cfg = demo.get_config()
  cfg.data.crop = SIZE
  cfg.model.pre_embed_dim = 48
  cfg.model.embed_dim = 32
  spec = steps.ModelSpec(cfg, K)
  devices = sharding.Devices()
  bb = backbones.load_variables(cfg.model.backbone, "random", SIZE, 0)
  state = steps.create_state(spec, bb, 0)
  rng = np.random.default_rng(0)
  state = state.replace(centres=jnp.asarray(rng.normal(size=state.centres.shape), jnp.float32))
  state = jax.device_put(state, devices.replicated)

  def batch(i):  # numpy only: making a batch must not compile anything itself
    r = np.random.default_rng(100 + i)
    return {
        "image": r.integers(0, 256, (B, SIZE, SIZE, 3), dtype=np.uint8),
        "label": r.integers(0, K, (B,), dtype=np.int32),
    }

  return spec, devices, state, batch


@pytest.mark.slow
def test_train_and_predict_steps_compile_once(setup):
  spec, devices, state, batch = setup
  train_step = devices.jit_train(steps.make_train_step(spec))

  # First calls compile (the scorer on the initial state, before it is donated).
  with compile_events() as first:
    scorer = scoring.Scorer(spec, devices, B, state=state)
    scores0 = scorer(batch(0)["image"])
    state, metrics = train_step(state, devices.put_batch(batch(0)))
    jax.block_until_ready((state, metrics))
  assert any(e.endswith("backend_compile_duration") or "cache_hits" in e for e in first), first
  sizes = cache_size(train_step), cache_size(scorer.predict_step)

  # Later calls: new batches (same shapes), the state the previous step returned.
  host = [batch(i) for i in range(1, 4)]
  dev = [devices.put_batch(b) for b in host]
  jax.block_until_ready(dev)
  with compile_events() as later:
    for b in dev:
      state, metrics = train_step(state, b)
    jax.block_until_ready((state, metrics))
    scorer.set_state(state)  # scoring the trained state: the same prepare and predict steps
    outs = [scorer(b["image"]) for b in host]
    state, metrics = train_step(state, dev[0])  # training again after scoring
    jax.block_until_ready((state, metrics))
  assert later == [], f"recompiled after the first call: {later}"
  assert (cache_size(train_step), cache_size(scorer.predict_step)) == sizes
  if sizes[0] is not None:
    assert sizes == (1, 1)
  assert int(state.step) == 5
  assert all(np.isfinite(o["scores"]).all() for o in [scores0, *outs])
  assert cache_size(scorer._prepare) in (None, 1)  # prepared twice, compiled once
