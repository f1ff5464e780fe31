"""Image and mask preprocessing (docs/method.md §1).

Geometry reproduces torchvision's ``Resize(resize)`` (shorter side to ``resize``, the other side
``int(resize * long / short)``, PIL bilinear with PIL's built-in antialiasing) followed by
``CenterCrop(crop)`` (offsets ``int(round((h - crop) / 2.0))``, Python's round, zero padding when
the crop is larger than the image). The resize is done by PIL itself on the uint8 image, so
images match the reference PyTorch pipeline bit for bit.

Reading (``read_image``):
  * 8-bit images (PIL modes 1, L, P, LA, PA, RGB, RGBA, CMYK, YCbCr, ...) go through
    ``PIL.Image.convert('RGB')`` exactly as the reference does: grey is replicated, alpha is
    dropped (not composited), palettes are expanded.
  * Images with more than 8 bits per sample are scaled by range, not clipped: 16-bit samples
    become ``round(x / 257)`` (65535 -> 255), 32-bit integer samples
    ``round(x / (2**32 - 1) * 255)``, floats in [0, 1] are multiplied by 255 (other floats are
    clipped to [0, 255]). PIL's own ``convert('RGB')`` would clip 16-bit grey to 255, which is
    why these do not take the 8-bit path. 16-bit TIFFs (grey or RGB) are read with tifffile.
    Caveat: Pillow opens 48-bit RGB PNGs as 8-bit RGB by keeping the high byte
    (``x >> 8``); such files follow Pillow (at most one grey level from ``round(x / 257)``).
  * Unreadable or truncated files raise ``ImageReadError`` naming the file. (If some other code
    sets ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True``, Pillow pads truncated files instead.)
  * EXIF orientation is ignored, as in the reference.

Sizes: a file whose header declares more than ``Limits.max_pixels`` pixels or an aspect ratio
over ``Limits.max_aspect_ratio`` (``data.max_image_pixels``, ``data.max_aspect_ratio``) raises
``ImageReadError`` naming it before anything is decoded (a 170-byte PNG can declare 30000x1,
which the shorter-side resize would turn into gigabytes).

16-bit PNGs: a ``sBIT`` chunk (significant bits, e.g. 12) sets the full scale (4095 -> 255);
without one a 16-bit image whose samples all stay below 4096 is read as 16-bit (dark) with a
warning naming the file.

Masks (``read_mask``, ``data.mask_rule``): the largest colour sample of a pixel (alpha ignored,
palettes compared by colour), scaled to [0, 1] by the format's full scale (a mask with exactly
two values {0, v} by v). "binarise" (default, the documented rule): after the bilinear resize
(PIL mode 'F') and crop a pixel is a defect where the value is > 0.5, so near-zero noise (JPEG
artefacts 1-3 of 255) is not a defect. "reference_int_cast": the reference code's own rule, the
8-bit mask resized by PIL (bilinear) and cast to int after ``ToTensor``: a defect only where the
resized value is exactly 255.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from cras_jax.base import errors, schema

PathLike = str | os.PathLike[str]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Bumped whenever the output of this module changes, so cached preprocessed data is rebuilt.
PREPROCESS_VERSION = 2
MASK_RULES = schema.choices("data.mask_rule")


@dataclasses.dataclass(frozen=True)
class Limits:
  """The largest image a file may declare (decoded pixels, long side / short side)."""

  max_pixels: int = schema.default("data.max_image_pixels")
  max_aspect_ratio: float = schema.default("data.max_aspect_ratio")

  def problem(self, width: int, height: int) -> str | None:
    """Why a width x height image is refused, or None."""
    if width * height > self.max_pixels:
      return (
          f"{width}x{height} = {width * height} pixels exceeds data.max_image_pixels="
          f"{self.max_pixels} (raise it for such images)"
      )
    if min(width, height) < 1 or max(width, height) / min(width, height) > self.max_aspect_ratio:
      return (
          f"{width}x{height} has an aspect ratio over data.max_aspect_ratio="
          f"{self.max_aspect_ratio:g} (raise it for such images)"
      )
    return None


_TIFF_EXTS = (".tif", ".tiff")


class ImageReadError(errors.UserValueError):
  """An image or mask file cannot be decoded (missing, corrupt, truncated, unsupported)."""


def open_checked(path: PathLike, limits: Limits | None) -> Image.Image:
  """Image.open (header only), the declared size checked against `limits` (default
  `Limits()`); errors name the file."""
  limits = Limits() if limits is None else limits
  # Pillow refuses images over 2 x Image.MAX_IMAGE_PIXELS in `open` (its decompression-bomb
  # guard) before `limits` could be applied: raised to `limits.max_pixels`, the limit that
  # applies is the configured one, and raising data.max_image_pixels works as the messages say.
  if limits.max_pixels > (Image.MAX_IMAGE_PIXELS or 0):
    Image.MAX_IMAGE_PIXELS = limits.max_pixels
  try:
    im = Image.open(path)
  except FileNotFoundError as e:
    raise ImageReadError(f"image file not found: {os.fspath(path)}") from e
  except Image.DecompressionBombError as e:
    raise ImageReadError(
        f"image file {os.fspath(path)} is too large to decode ({e}); raise "
        f"data.max_image_pixels for such images"
    ) from None
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    raise ImageReadError(
        f"cannot read image file {os.fspath(path)}: {type(e).__name__}: {e} "
        "(file corrupt, truncated or in an unsupported format)"
    ) from e
  why = limits.problem(*im.size)
  if why:
    im.close()
    raise ImageReadError(f"image file {os.fspath(path)} is refused: {why}")
  return im


def _open_loaded(path: PathLike, limits: Limits | None = None) -> Image.Image:
  im = open_checked(path, limits)
  try:
    im.load()
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    im.close()
    raise ImageReadError(
        f"cannot read image file {os.fspath(path)}: {type(e).__name__}: {e} "
        "(file corrupt, truncated or in an unsupported format)"
    ) from e
  return im


def _tiff_bits_per_sample(im: Image.Image) -> int:
  tags = getattr(im, "tag_v2", None)
  if tags is None:
    return 8
  bits = tags.get(258, 8)  # BitsPerSample
  if isinstance(bits, (tuple, list)):
    bits = max(bits) if bits else 8
  return int(bits)


def png_significant_bits(path: PathLike) -> int | None:
  """The largest colour entry of a PNG's sBIT chunk (significant bits per sample), or None
  when the file is no PNG or has no sBIT chunk before its image data."""
  try:
    with open(path, "rb") as f:
      if f.read(8) != b"\x89PNG\r\n\x1a\n":
        return None
      for _ in range(64):  # sBIT comes before IDAT, among the first chunks
        head = f.read(8)
        if len(head) < 8:
          return None
        length, kind = struct.unpack(">I4s", head)
        if kind == b"IDAT":
          return None
        if kind == b"sBIT":
          data = f.read(min(length, 4))
          return max(data) if data else None
        f.seek(length + 4, os.SEEK_CUR)
  except OSError:
    return None
  return None


def _to_uint8_by_range(arr: np.ndarray, path: PathLike, bits: int | None = None) -> np.ndarray:
  """Scale samples of any depth to uint8 (see module docstring); `bits`: the file's declared
  significant bits of integer samples."""
  if arr.dtype == np.uint8:
    return arr
  if arr.dtype == np.bool_:
    return arr.astype(np.uint8) * 255
  if np.issubdtype(arr.dtype, np.floating):
    a = arr.astype(np.float64)
    finite = a[np.isfinite(a)]
    if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
      a = a * 255.0
    return np.clip(np.round(np.nan_to_num(a)), 0, 255).astype(np.uint8)
  if np.issubdtype(arr.dtype, np.integer):
    a = arr.astype(np.float64)
    info = np.iinfo(arr.dtype)
    if bits is not None and 8 <= bits < info.bits:
      scale = (2.0**bits - 1.0) / 255.0
    elif info.bits == 16:
      scale = 257.0
      if a.size and a.max() < 4096:
        warnings.warn(
            f"{os.fspath(path)}: a 16-bit image whose samples all stay below 4096 (12 bits) "
            f"and which declares no significant bits (PNG sBIT): read as 16-bit, so it comes "
            f"out dark; add an sBIT chunk or rescale the file to the full 16-bit range",
            stacklevel=2,
        )
    elif arr.dtype == np.int32 and a.size and a.min() >= 0 and a.max() <= 65535:
      scale = 257.0  # PIL mode 'I' holding 16-bit data
    else:
      scale = float(info.max) / 255.0
    return np.clip(np.round(a / scale), 0, 255).astype(np.uint8)
  raise ImageReadError(f"unsupported sample type {arr.dtype} in {os.fspath(path)}")


def _high_depth_array(im: Image.Image, path: PathLike) -> np.ndarray:
  ext = os.path.splitext(os.fspath(path))[1].lower()
  if ext in _TIFF_EXTS:
    import tifffile  # only for the 16-bit TIFFs Pillow cannot decode

    try:
      arr = tifffile.imread(os.fspath(path))
    except Exception as e:  # noqa: BLE001 - reported with the file name
      raise ImageReadError(f"cannot read TIFF file {os.fspath(path)}: {e}") from e
    # Keep the first page / frame if a stack was returned.
    while arr.ndim > 3 or (arr.ndim == 3 and arr.shape[-1] not in (1, 2, 3, 4)):
      arr = arr[0]
    return arr
  return np.asarray(im)


def read_image(path: PathLike, limits: Limits | None = None) -> np.ndarray:
  """Read an image file as uint8 RGB, shape (H, W, 3) (files over `limits` refused)."""
  im = _open_loaded(path, limits)
  try:
    high = im.mode in ("I", "F") or im.mode.startswith("I;16") or _tiff_bits_per_sample(im) > 8
    if not high:
      return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    arr = _high_depth_array(im, path)
  finally:
    im.close()
  if arr.ndim == 2:
    arr = arr[..., None]
  if arr.ndim != 3:
    raise ImageReadError(f"unexpected image shape {arr.shape} in {os.fspath(path)}")
  c = arr.shape[-1]
  if c in (1, 2):  # grey (+ alpha)
    arr = np.repeat(arr[..., :1], 3, axis=-1)
  elif c >= 3:  # RGB (+ alpha): drop alpha
    arr = arr[..., :3]
  bits = png_significant_bits(path) if np.issubdtype(arr.dtype, np.integer) else None
  return np.ascontiguousarray(_to_uint8_by_range(arr, path, bits))


def mask_samples(path: PathLike, limits: Limits | None = None) -> tuple[np.ndarray, float]:
  """A mask file's samples (H, W) (the largest colour sample of each pixel, alpha ignored)
  and the format's full-scale value."""
  im = _open_loaded(path, limits)
  try:
    if im.mode in ("1", "L", "I", "F") or im.mode.startswith("I;16"):
      arr = np.asarray(im)
    elif im.mode in ("LA", "La"):
      arr = np.asarray(im)[..., 0]
    else:  # P, PA, RGB, RGBA, CMYK, ...: compare colours, ignore alpha
      arr = np.asarray(im.convert("RGB"))
  finally:
    im.close()
  if arr.ndim == 3:
    arr = arr.max(axis=-1)
  if arr.dtype == np.bool_:
    return arr.astype(np.uint8), 1.0
  if np.issubdtype(arr.dtype, np.integer):
    bits = png_significant_bits(path)
    if bits is not None and 1 <= bits < 8 * arr.dtype.itemsize:
      return arr, 2.0**bits - 1.0
    full = 65535.0 if arr.dtype == np.int32 and arr.max(initial=0) <= 65535 else None
    return arr, full or float(np.iinfo(arr.dtype).max)
  return arr, 1.0


def read_mask(path: PathLike, rule: str = "binarise", limits: Limits | None = None) -> np.ndarray:
  """Read a mask file (module docstring). "binarise": float32 (H, W) in [0, 1] (a two-valued
  mask {0, v} becomes exactly {0, 1}); "reference_int_cast": the uint8 'L' mask the reference
  resizes."""
  if rule not in MASK_RULES:
    raise ValueError(f"data.mask_rule={rule!r}: choose one of {MASK_RULES}")
  arr, full = mask_samples(path, limits)
  if rule == "reference_int_cast":
    return np.clip(np.round(arr.astype(np.float64) * (255.0 / full)), 0, 255).astype(np.uint8)
  values = np.unique(arr)
  if len(values) == 2 and values[0] == 0:
    full = float(values[1])
  return np.clip(arr.astype(np.float32) / np.float32(full), 0.0, 1.0)


def resized_size(height: int, width: int, resize: int) -> tuple[int, int]:
  """Output (height, width) of torchvision ``Resize(resize)`` (shorter side to ``resize``)."""
  short, long = (width, height) if width <= height else (height, width)
  new_short, new_long = resize, int(resize * long / short)
  return (new_long, new_short) if width <= height else (new_short, new_long)


def center_crop_offsets(height: int, width: int, crop: int) -> tuple[int, int]:
  """(top, left) of torchvision ``CenterCrop(crop)`` on an image at least crop x crop."""
  return int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))


def _center_crop(arr: np.ndarray, crop: int) -> np.ndarray:
  h, w = arr.shape[:2]
  if crop > h or crop > w:  # torchvision pads with zeros first
    pad_t = (crop - h) // 2 if crop > h else 0
    pad_l = (crop - w) // 2 if crop > w else 0
    pad_b = (crop - h + 1) // 2 if crop > h else 0
    pad_r = (crop - w + 1) // 2 if crop > w else 0
    pad = [(pad_t, pad_b), (pad_l, pad_r)] + [(0, 0)] * (arr.ndim - 2)
    arr = np.pad(arr, pad)
    h, w = arr.shape[:2]
    if h == crop and w == crop:
      return arr
  top, left = center_crop_offsets(h, w, crop)
  return arr[top : top + crop, left : left + crop]


def resize_and_crop_image(img: np.ndarray, resize: int, crop: int) -> np.ndarray:
  """torchvision ``Resize(resize)`` + ``CenterCrop(crop)`` on a uint8 RGB image."""
  img = np.asarray(img)
  if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
    raise ValueError(f"expected uint8 HxWx3 image, got {img.dtype} {img.shape}")
  h, w = img.shape[:2]
  new_h, new_w = resized_size(h, w, resize)
  pil = Image.fromarray(img)
  if (new_h, new_w) != (h, w):
    pil = pil.resize((new_w, new_h), Image.BILINEAR)
  out = np.asarray(pil, dtype=np.uint8)
  return np.ascontiguousarray(_center_crop(out, crop))


def resize_and_crop_mask(
    mask: np.ndarray, resize: int, crop: int, rule: str = "binarise"
) -> np.ndarray:
  """Same geometry as the image: a [0, 1] float mask (PIL 'F' bilinear), then > 0.5; with
  rule "reference_int_cast" a uint8 mask (PIL 'L' bilinear), then == 255 -> uint8 {0, 1}."""
  if rule == "reference_int_cast":
    m = np.asarray(mask, dtype=np.uint8)
    h, w = m.shape
    new_h, new_w = resized_size(h, w, resize)
    pil = Image.fromarray(np.ascontiguousarray(m))  # mode 'L'
    if (new_h, new_w) != (h, w):
      pil = pil.resize((new_w, new_h), Image.BILINEAR)
    out = _center_crop(np.asarray(pil, dtype=np.uint8), crop)
    return np.ascontiguousarray((out == 255).astype(np.uint8))
  mask = np.asarray(mask, dtype=np.float32)
  if mask.ndim != 2:
    raise ValueError(f"expected HxW mask, got shape {mask.shape}")
  h, w = mask.shape
  new_h, new_w = resized_size(h, w, resize)
  pil = Image.fromarray(np.ascontiguousarray(mask))  # mode 'F'
  assert pil.mode == "F"
  if (new_h, new_w) != (h, w):
    pil = pil.resize((new_w, new_h), Image.BILINEAR)
  out = np.asarray(pil, dtype=np.float32)
  return np.ascontiguousarray((_center_crop(out, crop) > 0.5).astype(np.uint8))


def load_example(
    image_path: PathLike,
    mask_path: PathLike | None,
    resize: int,
    crop: int,
    mask_rule: str = "binarise",
    limits: Limits | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Read and preprocess one image and its mask (all zeros when ``mask_path`` is None)."""
  raw = read_image(image_path, limits)
  image = resize_and_crop_image(raw, resize, crop)
  if mask_path is None:
    mask = np.zeros((crop, crop), np.uint8)
  else:
    raw_mask = read_mask(mask_path, mask_rule, limits)
    if resized_size(*raw_mask.shape, resize) != resized_size(*raw.shape[:2], resize):
      raise ImageReadError(
          f"mask {os.fspath(mask_path)} has size {raw_mask.shape[1]}x{raw_mask.shape[0]}, "
          f"which does not match image {os.fspath(image_path)} "
          f"({raw.shape[1]}x{raw.shape[0]}) after resizing"
      )
    mask = resize_and_crop_mask(raw_mask, resize, crop, mask_rule)
  return image, mask


def normalize(images):
  """uint8 images [..., 3] -> float32 ``(x / 255 - mean) / std`` (jax.numpy, jit-friendly)."""
  import jax.numpy as jnp  # here only: the rest of the data layer is numpy and PIL

  x = jnp.asarray(images).astype(jnp.float32) / jnp.float32(255.0)
  mean = jnp.asarray(IMAGENET_MEAN, dtype=jnp.float32)
  std = jnp.asarray(IMAGENET_STD, dtype=jnp.float32)
  return (x - mean) / std
