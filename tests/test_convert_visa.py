"""convert_visa: every path built from the split CSV stays under its root."""

import csv

import numpy as np
import pytest
from PIL import Image

from cras_jax.data import layout
from tools import convert_visa


def _visa(tmp_path, rows):
  visa = tmp_path / "visa"
  d = visa / "candle" / "Data" / "Images" / "Normal"
  d.mkdir(parents=True)
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "000.JPG", format="JPEG")
  (tmp_path / "secret.JPG").write_bytes((d / "000.JPG").read_bytes())  # outside the root
  (visa / "split_csv").mkdir()
  with open(visa / "split_csv" / "1cls.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(convert_visa.COLUMNS))
    w.writeheader()
    w.writerows(rows)
  return visa


def _row(obj="candle", image="candle/Data/Images/Normal/000.JPG", mask=""):
  return {"object": obj, "split": "train", "label": "normal", "image": image, "mask": mask}


@pytest.mark.parametrize(
    "row, named",
    [
        (_row(obj="../x"), "'../x'"),
        (_row(obj="/abs"), "'/abs'"),
        (_row(obj=".."), "'..'"),
        (_row(image="../secret.JPG"), "'../secret.JPG'"),
        (_row(image="candle/../../secret.JPG"), "candle/../../secret.JPG"),
        (_row(image="SECRET_ABS"), "absolute path"),
    ],
)
def test_paths_from_the_split_csv_cannot_leave_their_roots(tmp_path, row, named):
  if row["image"] == "SECRET_ABS":
    row["image"] = str(tmp_path / "secret.JPG")
  visa = _visa(tmp_path, [_row(), row])
  out = tmp_path / "out"
  before = sorted(p.name for p in tmp_path.iterdir())
  with pytest.raises(convert_visa.ConversionError) as ei:
    convert_visa.convert(visa, out, log=lambda s: None)
  assert named in str(ei.value)
  assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written anywhere


def test_plain_relative_paths_are_converted(tmp_path):
  visa = _visa(tmp_path, [_row()])
  out = tmp_path / "out"
  assert convert_visa.convert(visa, out, log=lambda s: None) == {"written": 1, "skipped": 0}
  assert (out / "candle" / "train" / "good" / "000.JPG").is_file()


@pytest.mark.parametrize("rel", ["a/b.png", "a\\b.png", "x.JPG"])
def test_relative_path_rule_accepts_plain_components(rel, tmp_path):
  assert layout.relative_path_problem(rel) is None
  assert layout.confined(tmp_path, rel).startswith(str(tmp_path))


@pytest.mark.parametrize(
    "rel", ["", "/etc/passwd", "\\\\host\\x", "C:x", "a/../../b", ".hidden/x", "a//b"]
)
def test_relative_path_rule_refuses_escapes(rel):
  assert layout.relative_path_problem(rel) is not None
