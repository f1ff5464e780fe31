"""The run-only scorers' output file (`run_exported`, `run_onnx`): NumPy and the standard library
only, so `run_onnx` stays free of JAX."""

from __future__ import annotations

import os
import sys

import numpy as np


def output_problem(path: str) -> str | None:
  """Why `--output=path` cannot be written, checked before any scoring (None: it can): an
  existing folder (np.savez would write `<folder>.npz` beside it), a missing parent folder or
  one that is a file."""
  npz = path if path.endswith(".npz") else path + ".npz"
  if os.path.isdir(path) or os.path.isdir(npz):
    return f"--output={path}: is a folder; name the .npz file to write (e.g. {path}/scores.npz)"
  parent = os.path.dirname(os.path.abspath(npz))
  if not os.path.isdir(parent):
    what = "is a file" if os.path.exists(parent) else "does not exist"
    return f"--output={path}: its folder {parent} {what}; create the folder or name another"
  if not os.access(parent, os.W_OK):
    return f"--output={path}: its folder {parent} cannot be written; name another"
  return None


def check_output(path: str) -> None:
  """Raises OSError with `output_problem`'s message for `--output=path` (".npz" added)."""
  problem = output_problem(path)
  if problem:
    raise OSError(problem)


def save_outputs(path: str, out: dict) -> None:
  """`out` as an .npz file (".npz" added as np.savez does), written to a temporary in the same
  directory, fsynced and renamed: the file is complete or absent, never truncated. A path that
  cannot be written raises OSError naming `--output` (`output_problem`), not the temporary."""
  check_output(path)
  path = path if path.endswith(".npz") else path + ".npz"
  tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp")
  try:
    with open(tmp, "wb") as f:
      np.savez(f, **out)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:
    raise OSError(f"--output={path}: cannot be written ({e.strerror or e})") from None
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def print_results(
    labels, label_header: str, out: dict, meta: dict, args, quiet: bool = False
) -> None:
  """The scorers' table on stdout (unless `quiet`), one row per image (`labels`: file names or
  indices): its class, score, normalised score, decision and defect fraction; `n/a` where the
  export applies no threshold (`decisions_made`: args.image_threshold / pixel_threshold, or
  the export's), said once on stderr either way."""
  classes = meta["class_names"]
  decided = decisions_made(meta, args.image_threshold, args.pixel_threshold)
  note = no_decision_note(decided)
  if note:
    print(note, file=sys.stderr)
  if quiet:
    return
  print(f"{label_header}\tclass\tscore\tnormalised\tanomalous\tdefect_fraction")
  for i, label in enumerate(labels):
    anomalous = int(out["is_anomaly"][i]) if decided["image"] else "n/a"
    fraction = f"{out['masks'][i].mean():.4f}" if decided["pixel"] else "n/a"
    print(
        f"{label}\t{classes[int(out['cls'][i])]}\t{out['scores'][i]:.6f}\t"
        f"{out['normalised_scores'][i]:.4f}\t{anomalous}\t{fraction}"
    )


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
