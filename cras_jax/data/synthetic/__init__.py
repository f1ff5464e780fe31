"""Deterministic synthetic multi-class industrial anomaly dataset (MVTec AD layout).

The generator produces a small dataset that is good enough to exercise the whole CRAS pipeline
(training on normal images of several classes with one model, image- and pixel-level AUROC
evaluation) in a few minutes on a CPU:

* two texture classes (``fabric``: plain-weave cloth, ``granite``: granular stone with random
  grains) and two object classes (``gear``: a spur gear with lightening holes on a plain
  background, ``chip``: an IC package with gull-wing pins on a PCB);
* normal variation: object position/rotation jitter, texture phase/orientation jitter,
  per-image gain / contrast / white balance, a smooth illumination gradient and sensor noise;
* 3 defect kinds per class with pixel-accurate masks. Defects are made of colours that also
  occur in normal images (a cut shows the weave's own dark gaps, a missing tooth shows the
  background, a worn patch of stone has the stone's mean colour, ...), so that a per-pixel
  colour threshold does not solve the pixel-level task, while the local *structure* clearly
  differs.

Modules: ``draw`` (drawing primitives), ``textures`` and ``objects`` (the four renderers),
``images`` (classes, defect kinds, seeding, ``render``), ``writing`` (manifest, ``generate``,
contact sheet), ``cli`` (``python -m cras_jax.synthetic --root=DIR``).
"""

from cras_jax.data.synthetic.cli import main
from cras_jax.data.synthetic.images import (
    CLASSES,
    DEFECT_TYPES,
    OBJECT_CLASSES,
    TEXTURE_CLASSES,
    render,
)
from cras_jax.data.synthetic.writing import (
    GENERATOR_VERSION,
    MANIFEST_NAME,
    generate,
    make_contact_sheet,
)

__all__ = [
    "CLASSES",
    "TEXTURE_CLASSES",
    "OBJECT_CLASSES",
    "DEFECT_TYPES",
    "GENERATOR_VERSION",
    "MANIFEST_NAME",
    "generate",
    "render",
    "make_contact_sheet",
    "main",
]
