"""Command line of the synthetic dataset generator.

python -m cras_jax.synthetic --root=DIR [--seed=0] [--image_size=160]
    [--n_train=40] [--n_test_good=12] [--n_test_defect_per_type=6] [--contact_sheet=PNG]
python -m cras_jax.synthetic --root=DIR --layout=mvtec_ad2 [--n_validation=10] [--n_private=6]
    MVTec AD 2's folders and eight class names (`mvtec_ad2.generate`): images --image_size
    high and 1.25 times as wide, 3 x --n_test_defect_per_type defective test_public images
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from absl import app, flags

from cras_jax.base import flag_checks
from cras_jax.data.synthetic import mvtec_ad2, writing


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The generator's flags (defined when it runs as a command)."""
  fv = flag_values
  flags.DEFINE_string("root", None, "Output directory (MVTec AD layout).", flag_values=fv)
  flags.DEFINE_integer(
      "seed", 0, "Dataset seed (every image has its own generator).", flag_values=fv
  )
  flags.DEFINE_integer("image_size", 160, "Image side in pixels.", flag_values=fv)
  flags.DEFINE_integer("n_train", 40, "Normal training images per class.", flag_values=fv)
  flags.DEFINE_integer("n_test_good", 12, "Normal test images per class.", flag_values=fv)
  flags.DEFINE_integer("n_test_defect_per_type", 6, "Test images per defect kind.", flag_values=fv)
  flags.DEFINE_string(
      "contact_sheet", None, "Also write a PNG overview to this path.", flag_values=fv
  )
  flags.DEFINE_enum(
      "layout",
      "mvtec",
      ["mvtec", "mvtec_ad2"],
      "mvtec: the demo's MVTec AD layout; mvtec_ad2: MVTec AD 2's folders and class names.",
      flag_values=fv,
  )
  flags.DEFINE_integer(
      "n_validation", 10, "mvtec_ad2: normal validation images per class.", flag_values=fv
  )
  flags.DEFINE_integer(
      "n_private", 6, "mvtec_ad2: images per class in each private test set.", flag_values=fv
  )
  flags.mark_flag_as_required("root", flag_values=fv)
  flag_checks.bounded(fv, "image_size", 32, 4096)  # as data.synthetic.image_size
  for name in ("n_train", "n_test_good", "n_test_defect_per_type", "n_validation", "n_private"):
    flag_checks.bounded(fv, name, 1, 100_000)
  flag_checks.bounded(fv, "seed", 0)


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  fv = flag_values
  t0 = time.time()
  if fv.layout == "mvtec_ad2":
    if fv.contact_sheet:
      raise app.UsageError("--contact_sheet draws the mvtec layout only")

    classes = mvtec_ad2.generate(
        fv.root,
        seed=fv.seed,
        height=fv.image_size,
        n_train=fv.n_train,
        n_validation=fv.n_validation,
        n_test_good=fv.n_test_good,
        n_test_bad=3 * fv.n_test_defect_per_type,
        n_private=fv.n_private,
    )
    print(f"synthetic MVTec AD 2 at {fv.root}: classes={classes} ({time.time() - t0:.1f}s)")
    return 0
  classes = writing.generate(
      fv.root, fv.seed, fv.image_size, fv.n_train, fv.n_test_good, fv.n_test_defect_per_type
  )
  print(f"synthetic dataset at {fv.root}: classes={classes} ({time.time() - t0:.1f}s)")
  if fv.contact_sheet:
    print("contact sheet:", writing.make_contact_sheet(fv.root, fv.contact_sheet))
  return 0
