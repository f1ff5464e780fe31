"""The correctness checks of the accelerator check (cras_jax/accelerator_check.py): one
training step and one scoring step on a device against the host CPU backend of the same
process, bit-identical reruns, and the exported model's lowering for the platform."""

from __future__ import annotations

import jax
import numpy as np
from jax import export as jax_export

from cras_jax.deploy import exporting
from cras_jax.engine import sharding, steps
from cras_jax.scoring import scoring

# Tolerances of the device against the CPU. float32: GPUs run float32 matmuls and
# convolutions on TF32 tensor cores and TPUs in one bfloat16 pass by default (10 and 8
# mantissa bits), so scores agree to about 1e-2 relative; Adam's first step moves every
# parameter by about lr whatever the gradient's size, so a gradient whose sign flips moves
# it by up to 2 lr: parameters are compared against 2.5 lr.
TOLERANCES = {
    "float32": {"scores_rtol": 2e-2, "maps_rtol": 2e-2, "loss_rtol": 2e-2, "params_lr": 2.5},
    "bfloat16": {"scores_rtol": 6e-2, "maps_rtol": 6e-2, "loss_rtol": 6e-2, "params_lr": 2.5},
}


def host_inputs(spec: steps.ModelSpec, backbone_vars, batch: int, seed: int = 0):
  """A fresh host state (random centres) and a host batch of uint8 images and labels."""
  rng = np.random.default_rng(seed)
  state = steps.create_state(spec, backbone_vars, seed)
  state = state.replace(centres=rng.standard_normal(state.centres.shape).astype(np.float32))
  size = spec.image_size
  data = {
      "image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
      "label": rng.integers(0, spec.num_classes, (batch,), dtype=np.int32),
  }
  return jax.device_get(state), data


_STEPS: dict = {}  # (spec, device, batch) -> (devices, scorer, jitted train step): compiled once


def _steps_on(spec, device, batch: int):
  key = (id(spec), device.platform, device.id, batch)
  if key not in _STEPS:
    devices = sharding.Devices(devices=[device])
    train = devices.jit_train(steps.make_train_step(spec), deterministic=True)
    _STEPS[key] = (spec, devices, scoring.Scorer(spec, devices, batch), train)
  return _STEPS[key][1:]


def run_steps(spec, device, state, data, n_steps: int = 1):
  """`n_steps` deterministic training steps and one scoring step on `device` -> host
  (params, last metrics, score outputs of the initial state)."""
  devices, scorer, train = _steps_on(spec, device, len(data["image"]))
  scorer.set_state(devices.put_replicated(state))
  scored = scorer(data["image"], ("scores", "maps"))
  s = devices.put_replicated(state)
  metrics = None
  for _ in range(n_steps):
    s, metrics = train(s, devices.put_batch(data))
  return jax.device_get(s.params), jax.device_get(metrics), scored


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def against_cpu(spec, backbone_vars, batch: int, dtype: str) -> dict:
  """One training and one scoring step on the default device against the CPU backend."""
  state, data = host_inputs(spec, backbone_vars, batch)
  dev, cpu = jax.devices()[0], jax.devices("cpu")[0]
  p_dev, m_dev, s_dev = run_steps(spec, dev, state, data)
  p_cpu, m_cpu, s_cpu = run_steps(spec, cpu, state, data)
  tol = TOLERANCES[dtype]
  lr = max(spec.config.train.lr_adapter, spec.config.train.lr_disc)
  params_diff = max(
      float(np.abs(np.asarray(a) - np.asarray(b)).max())
      for a, b in zip(jax.tree.leaves(p_dev), jax.tree.leaves(p_cpu))
  )
  out = {
      "device": str(dev),
      "dtype": dtype,
      "scores_rel_diff": _rel(s_dev["scores"], s_cpu["scores"]),
      "maps_rel_diff": _rel(s_dev["maps"], s_cpu["maps"]),
      "loss_rel_diff": _rel(m_dev["loss"], m_cpu["loss"]),
      "params_max_abs_diff": params_diff,
      "params_max_abs_diff_in_lr": params_diff / lr,
      "tolerances": tol,
  }
  out["ok"] = bool(
      out["scores_rel_diff"] <= tol["scores_rtol"]
      and out["maps_rel_diff"] <= tol["maps_rtol"]
      and out["loss_rel_diff"] <= tol["loss_rtol"]
      and out["params_max_abs_diff_in_lr"] <= tol["params_lr"]
  )
  return out


def bit_identical(spec, backbone_vars, batch: int, n_steps: int = 3) -> dict:
  """Two identical runs of `n_steps` deterministic steps on the default device."""
  state, data = host_inputs(spec, backbone_vars, batch, seed=1)
  dev = jax.devices()[0]
  a = jax.tree.leaves(run_steps(spec, dev, state, data, n_steps)[0])
  b = jax.tree.leaves(run_steps(spec, dev, state, data, n_steps)[0])
  same = all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
  return {"steps": n_steps, "bit_identical": bool(same), "ok": bool(same)}


def exported_scores(spec, backbone_vars, batch: int) -> dict:
  """Exports the scoring function for this platform (cras_jax/export.py's function and
  lowering), serialises, loads and runs it, against the scorer on the same device."""
  state, data = host_inputs(spec, backbone_vars, batch, seed=2)
  devices, scorer, _ = _steps_on(spec, jax.devices()[0], batch)
  scorer.set_state(devices.put_replicated(state))
  want = scorer(data["image"], ("scores", "maps"))
  k = spec.num_classes
  tree = {
      "svars": jax.device_get(scorer.svars),
      "loc": np.zeros((k,), np.float32),
      "scale": np.ones((k,), np.float32),
  }
  leaves, treedef = jax.tree.flatten(tree)
  shapes = [jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype) for x in leaves]
  platform = {"gpu": "cuda"}.get(jax.default_backend(), jax.default_backend())
  fn = exporting.make_score_fn(scorer.step_fn, treedef)
  blob = exporting._export(fn, shapes, spec.image_size, (platform,)).serialize()
  loaded = jax_export.deserialize(bytearray(blob))
  got = loaded.call(leaves, data["image"], np.float32(0), np.float32(0))
  out = {
      "platform": platform,
      "bytes": len(blob),
      "scores_rel_diff": _rel(got["scores"], want["scores"]),
      "maps_rel_diff": _rel(got["maps"], want["maps"]),
  }
  out["ok"] = bool(out["scores_rel_diff"] <= 1e-4 and out["maps_rel_diff"] <= 1e-4)
  return out
