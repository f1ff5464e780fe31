"""Deterministic XLA programs (`config.train.deterministic`, docs/performance.md).

What each platform guarantees for the same program, inputs and devices:
- CPU: deterministic already (reductions run in a fixed order; no atomics).
- GPU: XLA may use atomics (scatter-add, some reductions) and autotuned kernels whose
  reduction order varies, so reruns can differ in the last bits. `--xla_gpu_deterministic_ops`
  makes XLA pick deterministic implementations (sorted scatters, no atomics, deterministic
  cuDNN/cuBLAS algorithms); it costs time on steps with large scatters.
- TPU: deterministic by default.
The switch does both: `use_xla_flag` adds the flag to XLA_FLAGS, which XLA reads once, when
JAX starts its backends (so before the first jax.devices() or computation of the process:
`cras_jax.main` calls it right after parsing the config), and `COMPILER_OPTIONS` go to the
training step's own jit (`sharding.Devices.jit_train`), which holds even when the backends
started earlier (e.g. in a test or a notebook). On the CPU the compiled step is the same with
or without it (tests/engine/test_determinism.py compares the HLO).
"""

from __future__ import annotations

import os
import sys

from jax._src import xla_bridge

FLAG = "--xla_gpu_deterministic_ops=true"
COMPILER_OPTIONS = {"xla_gpu_deterministic_ops": True}


def use_xla_flag(enabled: bool) -> bool:
  """Adds FLAG to XLA_FLAGS when `enabled` and JAX's backends have not started; returns
  whether the process's backends will see it (False when they started already: the jitted
  training step still gets COMPILER_OPTIONS)."""
  if not enabled:
    return False
  current = os.environ.get("XLA_FLAGS", "")
  if "xla_gpu_deterministic_ops" in current:
    return "xla_gpu_deterministic_ops=false" not in current
  if xla_bridge.backends_are_initialized():
    print(
        "note: train.deterministic: JAX's backends started before the config was read; only "
        "the training step is compiled with deterministic ops",
        file=sys.stderr,
    )
    return False
  os.environ["XLA_FLAGS"] = (current + " " + FLAG).strip()
  return True
