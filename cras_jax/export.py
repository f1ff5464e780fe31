"""A portable export of the whole scoring function: one .npz file, run with jax and numpy only
(`--format=jax`, the default), or one .onnx file run without JAX (`--format=onnx`).

    python -m cras_jax.export --workdir=<trained run> --output=model.npz
    python -m cras_jax.run_exported model.npz crops.npy
    python -m cras_jax.export --workdir=<trained run> --format=onnx     # <run>/exported.onnx
    python -m cras_jax.run_onnx <run>/exported.onnx images/ [--runtime=openvino]
    python -m cras_jax.export --workdir=<trained run> --format=onnx --precision=int8

--precision=fp16|int8 compresses the ONNX file (cras_jax/deploy/compress.py): calibrated on
the run's normal training images (--calibration_images), checked against fp32 on held-back
normal images and refused beyond --max_flip_rate (or written with --force), thresholds
re-fitted on the compressed model's own scores (docs/deploy.md).

The ONNX file and its reader: cras_jax/deploy/onnx_export.py, cras_jax/run_onnx.py,
docs/deploy.md. What follows is the .npz format.

The function `score(weights, images, image_threshold, pixel_threshold)` (backbone, adapter,
matching, discriminator, anomaly map, per-class normalisation and the two decisions) is
serialised with `jax.export` for a symbolic batch size `b`:

  weights            list of arrays w000000, w000001, ... (the backbone's variables, the
                     heads' parameters and BatchNorm statistics, the class centres and the
                     per-class normalisation loc/scale): inputs of the function, not constants,
                     so the serialised module stays small and the weights are plain arrays
  images             uint8 [b, crop, crop, 3] RGB, preprocessed like the training data
                     (meta["input"])
  image_threshold,   float32 scalars (normalised units): the run's thresholds.json values are
  pixel_threshold    in meta["thresholds"]; any other value may be passed
  -> dict(scores [b], maps [b, crop, crop], patch [b, h, w], cls [b]   (= the predict step),
          normalised_scores [b], is_anomaly [b] uint8, masks [b, crop, crop] uint8)

File (numpy .npz, no pickles): "exported" (the serialised function, uint8 bytes), "meta" (UTF-8
JSON bytes: class names, preprocessing, thresholds, normalisation, platforms; the run id and
config it came from and the versions that exported it; a content checksum, SHA-256 over the
function, every weight and the rest of the meta, that `run_exported.load` verifies) and the
weights. Weights the function never reads (e.g. backbone stages past the last feature level)
are left out; the function takes exactly the stored ones. The module is lowered for
`--platforms` (default cpu and cuda); it runs on a jax of the same or a newer version.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from cras_jax.base import compile_cache, errors, flag_checks
from cras_jax.deploy import compress, onnx_export
from cras_jax.deploy.exporting import (  # noqa: F401 - the library, re-exported for its users
    FORMAT,
    FORMAT_VERSION,
    OUTPUTS,
    check_finite_weights,
    check_output_and_platforms,
    export_run,
    make_score_fn,
    used_weights,
    write_npz,
)
from cras_jax.runs import trained
from cras_jax.scoring import scoring

# jax stays the default: the format of every earlier export and of `cras_jax/run_exported.py`,
# and exact to the scorer by construction; onnx is for machines without JAX (docs/deploy.md).
FORMATS = ["jax", "onnx"]
SUFFIX = {"jax": "npz", "onnx": "onnx"}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command's flags (defined when it runs as a command)."""
  fv = flag_values
  flag_checks.define_trained_run_flags(fv)
  flags.DEFINE_enum(
      "format",
      "jax",
      FORMATS,
      "jax: an .npz of the function serialised by jax.export, run with jax "
      "(cras_jax/run_exported.py); onnx: one .onnx file run without JAX by onnxruntime or "
      "OpenVINO (python -m cras_jax.run_onnx).",
      flag_values=fv,
  )
  flags.DEFINE_string(
      "output",
      None,
      "The file to write (default <workdir>/exported.npz, or exported.onnx with --format=onnx).",
      flag_values=fv,
  )
  flags.DEFINE_list(
      "platforms",
      ["cpu", "cuda"],
      "Platforms to lower for (cpu, cuda, rocm, tpu).",
      flag_values=fv,
  )
  flags.DEFINE_float(
      "image_threshold",
      None,
      "Store this image threshold instead of the run's (normalised units).",
      flag_values=fv,
  )
  flags.DEFINE_float(
      "pixel_threshold", None, "Store this pixel threshold instead of the run's.", flag_values=fv
  )
  for name in ("image_threshold", "pixel_threshold"):
    flag_checks.bounded(fv, name)
  flags.DEFINE_enum(
      "precision",
      "fp32",
      list(compress.PRECISIONS),
      "--format=onnx only. fp32: the float32 graph; fp16: weights stored as float16 (half the "
      "file); int8: onnxruntime's static quantisation of the backbone and adapter, calibrated "
      "on the run's normal training images. A compressed export is checked against fp32 on "
      "held-back normal images and refused beyond --max_flip_rate (docs/deploy.md).",
      flag_values=fv,
  )
  flags.DEFINE_integer(
      "calibration_images",
      compress.DEFAULT_CALIBRATION_IMAGES,
      "--precision=int8: the run's normal training images the activations' ranges are "
      "calibrated on (all of them when fewer); the rest check it.",
      flag_values=fv,
  )
  flags.DEFINE_float(
      "max_flip_rate",
      compress.DEFAULT_MAX_FLIP_RATE,
      "--precision=fp16/int8: the largest share of held-back normal images the compressed "
      "model may decide otherwise than fp32; beyond it nothing is written (exit status 2).",
      flag_values=fv,
  )
  flags.DEFINE_bool(
      "force",
      False,
      "--precision=fp16/int8: write the compressed model whatever its measured flip rate.",
      flag_values=fv,
  )
  flag_checks.bounded(fv, "max_flip_rate", 0, 1)
  flag_checks.bounded(fv, "calibration_images", 1)


def main(argv, flag_values: flags.FlagValues = flags.FLAGS) -> int:
  fv = flag_values
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if "verbosity" not in fv or not fv["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  home = os.path.join(fv.workdir, "results", fv.member) if fv.member else fv.workdir
  output = fv.output or os.path.join(home, f"exported.{SUFFIX[fv.format]}")
  wrong = [f for f, suffix in SUFFIX.items() if f != fv.format and output.endswith(f".{suffix}")]
  if wrong:
    raise errors.UserValueError(
        f"--output={output}: a .{SUFFIX[wrong[0]]} name for --format={fv.format}; pass "
        f"--format={wrong[0]}, or name the file .{SUFFIX[fv.format]}"
    )
  if fv.format == "onnx" and fv["platforms"].present:
    raise errors.UserValueError(
        "--platforms applies to --format=jax (what jax.export lowers for); an ONNX file runs "
        "wherever its runtime does: drop --platforms"
    )
  compressed = fv.precision != "fp32"
  given = [
      f"--{n}"
      for n in ("precision", "calibration_images", "max_flip_rate", "force")
      if fv[n].present
  ]
  if fv.format != "onnx" and given:
    raise errors.UserValueError(
        f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to --format=onnx (a "
        f"compressed ONNX file); the .npz export is the float32 function itself: pass "
        f"--format=onnx, or drop {', '.join(given)}"
    )
  if not compressed and [g for g in given if g != "--precision"]:
    raise errors.UserValueError(
        f"{', '.join(g for g in given if g != '--precision')}: only with --precision=fp16 or "
        f"int8 (an fp32 export is not compressed, so nothing is calibrated or checked)"
    )
  check_output_and_platforms(output, fv.platforms)
  compile_cache.setup()  # before anything compiles: later starts reuse the steps
  run = trained.load_run(fv.workdir, member=fv.member)
  thr = scoring.load_thresholds(run, home, fv.image_threshold, fv.pixel_threshold)
  if thr.source == "none":
    print(
        "note: the run has no thresholds.json (python -m cras_jax.predict --calibrate "
        f"--workdir={fv.workdir}{f' --member={fv.member}' if fv.member else ''}): the export normalises nothing (loc 0, scale 1) and its "
        "stored thresholds are absent; pass thresholds to the exported function.",
        file=sys.stderr,
    )
  if fv.format == "onnx":
    images = (
        onnx_export.check_images(run, fv.workdir, fv.calibration_images) if compressed else None
    )
    try:
      onnx_export.export_onnx(run, thr, output, fv.precision, images, fv.max_flip_rate, fv.force)
    except onnx_export.onnx_graph.UnsupportedPrimitive as e:  # nothing is written
      raise errors.UserValueError(
          f"--format=onnx: this run's scoring function has no ONNX form here ({e}); export "
          f"it with --format=jax (scored by python -m cras_jax.run_exported)"
      ) from None
  else:
    export_run(run, thr, output, fv.platforms)
  return 0


if __name__ == "__main__":
  define_flags()
  errors.define_verbose_flag()
  errors.run(main)
