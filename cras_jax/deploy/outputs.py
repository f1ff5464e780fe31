"""The run-only scorers' output file (`run_exported`, `run_onnx`): NumPy and the standard library
only, so `run_onnx` stays free of JAX."""

from __future__ import annotations

import os

import numpy as np


def save_outputs(path: str, out: dict) -> None:
  """`out` as an .npz file (".npz" added as np.savez does), written to a temporary in the same
  directory, fsynced and renamed: the file is complete or absent, never truncated."""
  path = path if path.endswith(".npz") else path + ".npz"
  tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp")
  try:
    with open(tmp, "wb") as f:
      np.savez(f, **out)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def decisions_made(meta: dict, image_threshold=None, pixel_threshold=None) -> dict:
  """{"image": bool, "pixel": bool}: whether an export's scorer applies a threshold (given, or
  stored in the export's meta); without one the function decides nothing and its is_anomaly /
  masks outputs are 0 throughout."""
  stored = meta["thresholds"]
  return {
      "image": image_threshold is not None or stored.get("image") is not None,
      "pixel": pixel_threshold is not None or stored.get("pixel") is not None,
  }


def no_decision_note(decided: dict) -> str | None:
  """The line the scorers print on stderr when a decision is absent (`decisions_made`)."""
  missing = [k for k in ("image", "pixel") if not decided[k]]
  if not missing:
    return None
  what = {"image": "anomalous", "pixel": "defect_fraction"}
  return (
      f"note: the export has no {' and '.join(missing)} threshold: "
      + ", ".join(f"{what[k]} n/a" for k in missing)
      + " (its is_anomaly / masks outputs are 0 there: not decided, not normal); pass "
      + " / ".join(f"--{k}_threshold" for k in missing)
      + " (normalised units), or calibrate the run (python -m cras_jax.predict --calibrate) "
      "and export it again"
  )
