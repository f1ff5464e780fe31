"""The largest image a scorer reads: one rule for `python -m cras_jax.predict` and
`python -m cras_jax.run_onnx`, so both refuse the same files.

A file whose header declares more than `max_pixels` decoded pixels, or whose long side is more
than `max_aspect_ratio` times its short side, is refused before it is decoded (a 170-byte PNG
can declare 30000x1, which the shorter-side resize would turn into gigabytes). The values are
the run's `data.max_image_pixels` and `data.max_aspect_ratio`; an export records them in its
meta (`input.max_image_pixels`, `input.max_aspect_ratio`).

This module imports nothing (no NumPy, no JAX, nothing else of cras_jax): `run_onnx`, which
runs without JAX, imports it, and so does predict (`scoring.predict_inputs`).
"""

from __future__ import annotations

# The schema's defaults (cras_jax/base/schema.py; a test keeps them equal): the limits of a
# run saved before they existed, and of an export that does not record them.
MAX_PIXELS = 50_000_000
MAX_ASPECT_RATIO = 10.0


def problem(
    width: int,
    height: int,
    max_pixels: int = MAX_PIXELS,
    max_aspect_ratio: float = MAX_ASPECT_RATIO,
) -> str | None:
  """Why a width x height image is refused (naming the setting to raise), or None."""
  if width * height > max_pixels:
    return (
        f"{width}x{height} = {width * height} pixels exceeds data.max_image_pixels="
        f"{max_pixels} (raise it for such images)"
    )
  if min(width, height) < 1 or max(width, height) / min(width, height) > max_aspect_ratio:
    return (
        f"{width}x{height} has an aspect ratio over data.max_aspect_ratio="
        f"{max_aspect_ratio:g} (raise it for such images)"
    )
  return None


def from_meta(meta: dict) -> dict:
  """The limits an export's meta records (`input`), as `problem`'s keyword arguments; the
  defaults for an export written before they were recorded."""
  given = meta.get("input", {}) if isinstance(meta, dict) else {}
  return {
      "max_pixels": int(given.get("max_image_pixels", MAX_PIXELS)),
      "max_aspect_ratio": float(given.get("max_aspect_ratio", MAX_ASPECT_RATIO)),
  }
