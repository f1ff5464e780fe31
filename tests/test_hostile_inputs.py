"""Hostile input files: names that are paths, output names that could collide, non-binary
masks, 12-bit PNGs, images declaring huge sizes and crafted .pth files are each refused by
name or read by a documented rule, without exhausting memory."""

import io
import os
import struct
import warnings
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image

from cras_jax.backbones import torch_pickle
from cras_jax.data import layout, preprocess, validate
from cras_jax.scoring import predict_inputs

# ----------------------------------------------------------------------------- helpers


def _png_with_chunk(path, array, kind: bytes, data: bytes):
  """Saves `array` as PNG with an extra chunk inserted after IHDR (PIL writes no sBIT)."""
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  raw = buf.getvalue()
  ihdr_end = 8 + 8 + 13 + 4
  chunk = struct.pack(">I", len(data)) + kind + data
  chunk += struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
  path.write_bytes(raw[:ihdr_end] + chunk + raw[ihdr_end:])


def _png_header(path, width, height):
  """A PNG declaring width x height (8-bit grey) with one tiny IDAT: a few dozen bytes."""

  def chunk(kind, data):
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )

  ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
  idat = zlib.compress(b"\x00" * (width + 1))
  path.write_bytes(
      b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
  )


def _zip_pth(path, pkl: bytes, entries=(), compress=zipfile.ZIP_STORED):
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", pkl)
    for name, data in entries:
      z.writestr(f"archive/data/{name}", data, compress_type=compress)


# ----------------------------------------------------------------------------- names


def test_class_names_that_are_paths_are_refused(tmp_path):
  (tmp_path / "ds").mkdir()
  records, problems, _ = layout.collect(tmp_path / "ds", ["../escape"])
  assert records == [] and "'../escape' is not a plain name" in problems[0]
  for name in ("a/b", "..", ".hidden", "x\\y"):
    assert layout.plain_name_problem(name), name
  for name in ("metal_nut", "pcb1", "Schraube M4"):
    assert layout.plain_name_problem(name) is None, name


def test_output_names_never_collide():
  names = ["sub/b.png", "sub__b.png", "sub/b.jpg", "x/A.png", "x/a.png", "c.png"]
  stems = predict_inputs.output_stems(names)
  assert len({s.lower() for s in stems}) == len(names)
  assert stems[-1] == "c"  # names that do not collide keep the plain stem
  assert predict_inputs.output_stems(names) == stems  # deterministic


# ----------------------------------------------------------------------------- masks and images


def test_non_binary_masks_follow_the_documented_rule(tmp_path, capsys):
  rng = np.random.default_rng(0)
  m = rng.integers(0, 4, (60, 80)).astype(np.uint8)  # JPEG-like noise 0..3
  m[20:30, 30:50] = 255
  m[20:30, 50] = 200  # a soft edge
  Image.fromarray(m).save(tmp_path / "m.png")
  Image.fromarray(np.zeros((60, 80, 3), np.uint8)).save(tmp_path / "i.png")
  _, binarised = preprocess.load_example(tmp_path / "i.png", tmp_path / "m.png", 60, 60)
  # independent reference: scaled to [0, 1], PIL 'F' bilinear, centre crop, > 0.5
  f = np.asarray(Image.fromarray(m.astype(np.float32) / 255).resize((80, 60), Image.BILINEAR))
  want = (f[:, 10:70] > 0.5).astype(np.uint8)
  np.testing.assert_array_equal(binarised, want)
  assert 0.03 < binarised.mean() < 0.06  # not the 75 % of "any non-zero sample"
  _, ref = preprocess.load_example(
      tmp_path / "i.png", tmp_path / "m.png", 60, 60, "reference_int_cast"
  )
  np.testing.assert_array_equal(ref, (m[:, 10:70] == 255).astype(np.uint8))
  # downsampled: only pixels that stay exactly 255 count under the reference's rule
  _, ref_small = preprocess.load_example(
      tmp_path / "i.png", tmp_path / "m.png", 30, 30, "reference_int_cast"
  )
  small = np.asarray(Image.fromarray(m).resize((40, 30), Image.BILINEAR))[:, 5:35]
  np.testing.assert_array_equal(ref_small, (small == 255).astype(np.uint8))
  # validation names the mask
  validate.validate(
      [layout.Record("a", "test", "bad", str(tmp_path / "i.png"), str(tmp_path / "m.png"))],
      tmp_path,
      class_names=[],
  )
  assert "m.png (6 values)" in capsys.readouterr().err


def test_twelve_bit_pngs_use_their_significant_bits(tmp_path):
  a = np.linspace(0, 4095, 64 * 48).reshape(48, 64).astype(np.uint16)
  _png_with_chunk(tmp_path / "sbit.png", a, b"sBIT", bytes([12]))
  assert preprocess.png_significant_bits(tmp_path / "sbit.png") == 12
  img = preprocess.read_image(tmp_path / "sbit.png")
  np.testing.assert_array_equal(img[..., 0], np.round(a / 4095 * 255).astype(np.uint8))
  Image.fromarray(a).save(tmp_path / "plain.png")
  with pytest.warns(UserWarning, match="plain.png.*below 4096"):
    dark = preprocess.read_image(tmp_path / "plain.png")
  assert dark.max() == 16  # round(4095 / 257): as stored, but said so
  full = (a.astype(np.uint32) * 16).astype(np.uint16)
  Image.fromarray(full).save(tmp_path / "full.png")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert preprocess.read_image(tmp_path / "full.png").max() == 255


def test_images_declaring_huge_sizes_are_refused_by_name(tmp_path):
  Image.fromarray(np.zeros((1, 30000), np.uint8)).save(tmp_path / "strip.png")
  assert os.path.getsize(tmp_path / "strip.png") < 1000
  _png_header(tmp_path / "bomb.png", 14000, 14000)
  for name, why in (("strip.png", "aspect ratio"), ("bomb.png", "pixels|too large")):
    with pytest.raises(preprocess.ImageReadError, match=f"{name}.*({why})"):
      preprocess.read_image(tmp_path / name)
    with pytest.raises(ValueError, match=name):
      validate.image_size(tmp_path / name)
  records = [layout.Record("a", "train", "good", str(tmp_path / "strip.png"))]
  with pytest.raises(layout.DatasetError, match="strip.png"):
    validate.validate(records, tmp_path, class_names=[])
  got = list(predict_inputs.read_images([str(tmp_path / "strip.png")], 73, 64, 1))
  assert got[0][1] is None and "strip.png" in got[0][2]
  roomy = preprocess.Limits(max_pixels=10**6, max_aspect_ratio=40000.0)
  assert preprocess.read_image(tmp_path / "strip.png", roomy).shape == (1, 30000, 3)


# ----------------------------------------------------------------------------- weights files


def test_torch_reader_bounds_and_build(tmp_path):
  torch = pytest.importorskip("torch")
  # stride 0: one stored element declared as a 2**28-element tensor
  torch.save({"w": torch.zeros(1).expand(2**28)}, tmp_path / "stride0.pth")
  assert os.path.getsize(tmp_path / "stride0.pth") < 4096
  with pytest.raises(torch_pickle.TorchPickleError, match="more elements than its storage"):
    torch_pickle.load_torch_state_dict(tmp_path / "stride0.pth")
  # a deflated storage entry declaring far more than the file holds
  torch.save({"w": torch.zeros(2**20)}, tmp_path / "ok.pth")
  with zipfile.ZipFile(tmp_path / "ok.pth") as z:
    items = [(i.filename, z.read(i)) for i in z.infolist()]
  with zipfile.ZipFile(tmp_path / "bomb.pth", "w", zipfile.ZIP_DEFLATED) as z:
    for name, data in items:
      z.writestr(name, data)
  assert os.path.getsize(tmp_path / "bomb.pth") < 64 * 1024
  with pytest.raises(torch_pickle.TorchPickleError, match="compressed"):
    torch_pickle.load_torch_state_dict(tmp_path / "bomb.pth")
  assert torch_pickle.load_torch_state_dict(tmp_path / "ok.pth")["w"].shape == (2**20,)
  # BUILD on the shared storage stand-in: refused, and nothing changed for later loads
  evil = b"\x80\x02ctorch\nFloatStorage\nN}X\x04\x00\x00\x00nameX\x04\x00\x00\x00Evils\x86b."
  _zip_pth(tmp_path / "build.pth", evil)
  with pytest.raises(torch_pickle.TorchPickleError, match="BUILD"):
    torch_pickle.load_torch_state_dict(tmp_path / "build.pth")
  assert torch_pickle.ALLOWED_GLOBALS[("torch", "FloatStorage")].name == "FloatStorage"
  # a state dict's own OrderedDict state (torch's _metadata) is still read
  sd = torch.nn.Linear(2, 3).state_dict()
  torch.save(sd, tmp_path / "linear.pth")
  got = torch_pickle.load_torch_state_dict(tmp_path / "linear.pth")
  np.testing.assert_array_equal(got["weight"], sd["weight"].numpy())


def _png_header(path, width, height):
  """A PNG that declares width x height and holds no pixels (its header is all `open` reads)."""

  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

  ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_the_configured_pixel_limit_applies_above_pillows_own(tmp_path):
  """200 M pixels: over Pillow's decompression-bomb guard (2 x 89.5 M), under a configured
  limit of 300 M: the configured limit is the one that applies, both ways."""
  path = tmp_path / "huge.png"
  _png_header(path, 20_000, 10_000)
  im = preprocess.open_checked(path, preprocess.Limits(max_pixels=300_000_000))
  assert im.size == (20_000, 10_000)
  im.close()
  with pytest.raises(preprocess.ImageReadError, match="exceeds data.max_image_pixels=150000000"):
    preprocess.open_checked(path, preprocess.Limits(max_pixels=150_000_000))
