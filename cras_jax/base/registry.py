"""The one table of named inputs: backbones and datasets (stdlib only, cheap to import).

A backbone entry says how to build it (its family), which levels it has, where its default
weights come from and what identifies them; a dataset entry says its classes, where to get it
(and whether it can be fetched without a licence click), its pinned checksum and how it is
turned into the MVTec layout. `config_check`, the feature cache, the configs, the data code,
the converters and the downloaders all read these entries; nothing else lists names.

Configs import this module when they are read, so it imports nothing heavy (no JAX, no TFDS).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

# ----------------------------------------------------------------------------- backbones

# torchvision's own address of its pretrained weights (torchvision.models.*_Weights.url).
TORCHVISION_BASE_URL = "https://download.pytorch.org/models/"
# torch.hub's rule: the name's part between the last '-' and the suffix is a SHA-256 prefix.
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,})\.")


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
  name: str
  family: str  # "resnet" | "efficientnet_lite": the module that builds it
  levels: tuple[int, ...]  # the feature taps model.levels may name
  default_weights: str  # what model.weights="" means: "package" (offline) or "" (none)
  torchvision_file: str = ""  # the IMAGENET1K_V1 file at TORCHVISION_BASE_URL ("": none)
  # The full SHA-256 of torchvision_file. None where it could not be read here (the file
  # cannot be downloaded on the machine this was written on); the SHA-256 prefix carried by
  # the file name is always checked (as torch.hub does), and the full hash seen is recorded
  # beside the cached file.
  torchvision_sha256: str | None = None

  @property
  def torchvision_hash_prefix(self) -> str:
    return hash_prefix_of(self.torchvision_file)

  @property
  def variant(self) -> str:
    """The EfficientNet-Lite variant ("0", "2") or the ResNet arch name."""
    return self.name.split("_")[-1] if self.family == "efficientnet_lite" else self.name


def hash_prefix_of(file_name: str) -> str:
  """The SHA-256 prefix a torch.hub-style file name carries ("" when none)."""
  m = _HASH_IN_NAME.search(file_name)
  return m.group(1) if m else ""


_RESNET_LEVELS = (1, 2, 3, 4)
BACKBONES: dict[str, BackboneSpec] = {
    s.name: s
    for s in (
        BackboneSpec("resnet18", "resnet", _RESNET_LEVELS, "", "resnet18-f37072fd.pth"),
        BackboneSpec("resnet50", "resnet", _RESNET_LEVELS, "", "resnet50-0676ba61.pth"),
        BackboneSpec(
            "wide_resnet50_2", "resnet", _RESNET_LEVELS, "", "wide_resnet50_2-95faca4d.pth"
        ),
        BackboneSpec(
            "wide_resnet101_2", "resnet", _RESNET_LEVELS, "", "wide_resnet101_2-32ee1156.pth"
        ),
        BackboneSpec("efficientnet_lite0", "efficientnet_lite", (1, 2, 3, 4), "package"),
        BackboneSpec("efficientnet_lite2", "efficientnet_lite", (1, 2, 3, 4), "package"),
    )
}
RESNETS = tuple(n for n, s in BACKBONES.items() if s.family == "resnet")
EFFICIENTNETS = tuple(n for n, s in BACKBONES.items() if s.family == "efficientnet_lite")
BACKBONE_NAMES = tuple(BACKBONES)
# Every level any backbone has (a backbone's own are in its entry).
ALL_LEVELS = tuple(sorted({lv for s in BACKBONES.values() for lv in s.levels}))


def backbone(name: str) -> BackboneSpec | None:
  return BACKBONES.get(name)


# ----------------------------------------------------------------------------- datasets

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
MVTEC_AD2_CLASSES = (
    "can",
    "fabric",
    "fruit_jelly",
    "rice",
    "sheet_metal",
    "vial",
    "wallplugs",
    "walnuts",
)
# Real-IAD's 30 object categories, as its realiad_jsons/<category>.json files name them.
REAL_IAD_CLASSES = (
    "audiojack",
    "bottle_cap",
    "button_battery",
    "end_cap",
    "eraser",
    "fire_hood",
    "mint",
    "mounts",
    "pcb",
    "phone_battery",
    "plastic_nut",
    "plastic_plug",
    "porcelain_doll",
    "regulator",
    "rolled_strip_base",
    "sim_card_set",
    "switch",
    "tape",
    "terminalblock",
    "toothbrush",
    "toy",
    "toy_brick",
    "transistor1",
    "u_block",
    "usb",
    "usb_adaptor",
    "vcpill",
    "wooden_beads",
    "woodstick",
    "zipper",
)

# How a dataset's archive becomes a root the MVTec reader takes (data/fetch.py):
# "mvtec": already in the MVTec layout (BTAD's ok/ko folders are read as they are);
# "visa":  VisA's release with split_csv/1cls.csv, converted by tools.convert_visa;
# "mvtec_ad2": MVTec AD 2's own folders, read as they are by data/mvtec_ad2.py (train/good,
#              validation/good, test_public/{good,bad,ground_truth/bad}).
# "real_iad": Real-IAD's release, its JSON split files (realiad_jsons/<split set>/<category>.json)
#             naming every image and mask under realiad_<res>/, read by data/real_iad.py.
LAYOUTS = ("mvtec", "visa", "mvtec_ad2", "real_iad")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  name: str
  classes: tuple[str, ...]  # empty: discovered from the root's sub-folders
  url: str  # its home page: where a person gets it ("" when unknown)
  note: str  # one line
  archive_url: str = ""  # a direct public download ("": none; data.download_url may give one)
  # The archive's SHA-256, pinned only where it was verified; None: the hash seen at the
  # first download is recorded beside the prepared data (data/fetch.py) and reported.
  archive_sha256: str | None = None
  layout: str = "mvtec"  # LAYOUTS
  aliases: tuple[str, ...] = ()
  how_to_get: str = ""  # why it is not fetched automatically, when archive_url is ""


DATASETS: dict[str, DatasetSpec] = {
    s.name: s
    for s in (
        DatasetSpec(
            "mvtec",
            MVTEC_CLASSES,
            "https://www.mvtec.com/company/research/datasets/mvtec-ad",
            "MVTec AD, 15 classes; used as downloaded.",
            aliases=("mvtec_ad",),
            how_to_get="MVTec AD is distributed under CC BY-NC-SA 4.0 after accepting its "
            "licence on the download page (no stable direct address)",
        ),
        DatasetSpec(
            "visa",
            VISA_CLASSES,
            "https://github.com/amazon-science/spot-diff",
            "VisA, 12 classes; converted from its release (split_csv/1cls.csv) to the MVTec "
            "layout (python -m tools.convert_visa <VisA> <output> by hand).",
            archive_url="https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar",
            layout="visa",
        ),
        DatasetSpec(
            "mpdd",
            MPDD_CLASSES,
            "https://github.com/stepanje/MPDD",
            "MPDD, 6 classes of metal parts; already in the MVTec layout.",
            how_to_get="MPDD is shared through a cloud-drive link on its home page (no stable "
            "direct address)",
        ),
        DatasetSpec(
            "itdd",
            ITDD_CLASSES,
            "",
            "ITDD, 4 classes of industrial textiles, in the MVTec layout (download address "
            "not recorded here: see the CRAS paper's references).",
            how_to_get="ITDD's download address is not recorded here (see the CRAS paper's "
            "references)",
        ),
        DatasetSpec(
            "btad",
            BTAD_CLASSES,
            "http://avires.dimi.uniud.it/papers/btad/btad.zip",
            "BTAD (beanTech), 3 products; read as downloaded (ok = good, ko = defective, "
            "masks ground_truth/ko/<name>.png or .bmp).",
            archive_url="http://avires.dimi.uniud.it/papers/btad/btad.zip",
        ),
        DatasetSpec(
            "mvtec_ad2",
            MVTEC_AD2_CLASSES,
            "https://www.mvtec.com/company/research/datasets/mvtec-ad-2",
            "MVTec AD 2, 8 scenarios; read as downloaded (train/good, validation/good, "
            "test_public/good|bad, masks test_public/ground_truth/bad/<name>_mask.png); "
            "thresholds from validation/good (docs/mvtec_ad2.md).",
            layout="mvtec_ad2",
            how_to_get="MVTec AD 2 is distributed under CC BY-NC-SA 4.0 after accepting its "
            "licence on the download page (no stable direct address)",
        ),
        DatasetSpec(
            "real_iad",
            REAL_IAD_CLASSES,
            "https://realiad4ad.github.io/Real-IAD/",
            "Real-IAD, 30 categories x 5 views; read as released through its JSON splits "
            "(realiad_jsons/realiad_jsons/<category>.json, images realiad_<res>/<category>/) "
            "(docs/real_iad.md).",
            layout="real_iad",
            aliases=("realiad",),
            how_to_get="Real-IAD is distributed under CC BY-NC-SA 4.0 by its authors after a "
            "request on its home page (no public direct address)",
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
_ALIASES = {a: s.name for s in DATASETS.values() for a in s.aliases}
DATASET_NAMES = tuple(DATASETS) + tuple(_ALIASES)


def dataset(name: str) -> DatasetSpec | None:
  """The registered dataset `name` (or alias, e.g. "mvtec_ad"), or None (e.g. "synthetic")."""
  return DATASETS.get(_ALIASES.get(name, name))


def fetchable(name: str) -> bool:
  """Whether `name` is a registered dataset a download can provide (given an address)."""
  spec = dataset(name)
  return spec is not None and spec.name != "folder"


def resolve_classes(name: str, classes: Sequence[str] | None) -> list[str] | None:
  """The classes to load: `classes` when given (non-empty), else the registered list of
  `name`; None (discover from the root) for "folder", unknown names or empty lists."""
  if classes:
    return list(classes)
  spec = dataset(name)
  return list(spec.classes) if spec is not None and spec.classes else None
