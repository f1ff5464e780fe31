"""Registry of the named datasets (``config.data.name``): class lists, where to get them, notes.

Every dataset is read in the MVTec layout (``layout.EXPECTED_LAYOUT``) by
``cras_jax.data.mvtec``. BTAD's own layout (``train/ok``, ``test/ok``, ``test/ko``,
``ground_truth/ko/<name>.png`` or ``.bmp``) is read as it is (``ok`` is "good"); VisA's original
release is converted first with ``python -m cras_jax.convert_visa``. ``folder`` discovers its
classes from the sub-folders of the root (those holding ``train/`` or ``test/``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  name: str
  classes: tuple[str, ...]  # empty: discovered from the root's sub-folders
  url: str  # where to get it ("" when unknown)
  note: str  # one line


MVTEC_CLASSES = (
    "bottle",
    "cable",
    "capsule",
    "carpet",
    "grid",
    "hazelnut",
    "leather",
    "metal_nut",
    "pill",
    "screw",
    "tile",
    "toothbrush",
    "transistor",
    "wood",
    "zipper",
)
VISA_CLASSES = (
    "candle",
    "capsules",
    "cashew",
    "chewinggum",
    "fryum",
    "macaroni1",
    "macaroni2",
    "pcb1",
    "pcb2",
    "pcb3",
    "pcb4",
    "pipe_fryum",
)
MPDD_CLASSES = (
    "bracket_black",
    "bracket_brown",
    "bracket_white",
    "connector",
    "metal_plate",
    "tubes",
)
ITDD_CLASSES = ("cotton_fabric", "dyed_fabric", "hemp_fabric", "plaid_fabric")
BTAD_CLASSES = ("01", "02", "03")

REGISTRY: dict[str, DatasetSpec] = {
    s.name: s
    for s in (
        DatasetSpec(
            "mvtec",
            MVTEC_CLASSES,
            "https://www.mvtec.com/company/research/datasets/mvtec-ad",
            "MVTec AD, 15 classes; used as downloaded.",
        ),
        DatasetSpec(
            "visa",
            VISA_CLASSES,
            "https://github.com/amazon-science/spot-diff",
            "VisA, 12 classes; convert the original release first: "
            "python -m cras_jax.convert_visa <VisA> <output>.",
        ),
        DatasetSpec(
            "mpdd",
            MPDD_CLASSES,
            "https://github.com/stepanje/MPDD",
            "MPDD, 6 classes of metal parts; already in the MVTec layout.",
        ),
        DatasetSpec(
            "itdd",
            ITDD_CLASSES,
            "",
            "ITDD, 4 classes of industrial textiles, in the MVTec layout (download address "
            "not recorded here: see the CRAS paper's references).",
        ),
        DatasetSpec(
            "btad",
            BTAD_CLASSES,
            "http://avires.dimi.uniud.it/papers/btad/btad.zip",
            "BTAD (beanTech), 3 products; read as downloaded (ok = good, ko = defective, "
            "masks ground_truth/ko/<name>.png or .bmp).",
        ),
        DatasetSpec(
            "folder",
            (),
            "",
            "Any dataset in the MVTec layout; classes are the root's sub-folders holding "
            "train/ or test/ (or set data.classes).",
        ),
    )
}


def get(name: str) -> DatasetSpec | None:
  """The registered dataset ``name``, or None (e.g. ``synthetic``)."""
  return REGISTRY.get(name)


def resolve_classes(name: str, classes: Sequence[str] | None) -> list[str] | None:
  """The classes to load: ``classes`` when given (non-empty), else the registered list of
  ``name``; None (discover from the root) for ``folder``, unknown names or empty lists."""
  if classes:
    return list(classes)
  spec = get(name)
  return list(spec.classes) if spec is not None and spec.classes else None
