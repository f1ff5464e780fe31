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

Masks (``read_mask``): any format; a pixel is a defect where any colour sample is > 0 (alpha is
ignored, palette masks are compared by colour). Binarised to {0, 1} before resizing; after the
bilinear resize (PIL mode 'F') and crop a pixel is a defect where the value is > 0.5.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, UnidentifiedImageError

PathLike = str | os.PathLike[str]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Bumped whenever the output of this module changes, so cached preprocessed data is rebuilt.
PREPROCESS_VERSION = 1

_TIFF_EXTS = (".tif", ".tiff")


class ImageReadError(ValueError):
  """An image or mask file cannot be decoded (missing, corrupt, truncated, unsupported)."""


def _open_loaded(path: PathLike) -> Image.Image:
  try:
    im = Image.open(path)
    im.load()
  except FileNotFoundError as e:
    raise ImageReadError(f"image file not found: {os.fspath(path)}") from e
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
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


def _to_uint8_by_range(arr: np.ndarray, path: PathLike) -> np.ndarray:
  """Scale samples of any depth to uint8 (see module docstring)."""
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
    if info.bits == 16:
      scale = 257.0
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


def read_image(path: PathLike) -> np.ndarray:
  """Read an image file as uint8 RGB, shape (H, W, 3)."""
  im = _open_loaded(path)
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
  return np.ascontiguousarray(_to_uint8_by_range(arr, path))


def read_mask(path: PathLike) -> np.ndarray:
  """Read a mask file as float32 (H, W) in {0, 1}: 1 where any colour sample is > 0."""
  im = _open_loaded(path)
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
  return (arr > 0).astype(np.float32)


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


def resize_and_crop_mask(mask: np.ndarray, resize: int, crop: int) -> np.ndarray:
  """Same geometry as the image on a {0,1} float mask (PIL 'F' bilinear), then > 0.5."""
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
    image_path: PathLike, mask_path: PathLike | None, resize: int, crop: int
) -> tuple[np.ndarray, np.ndarray]:
  """Read and preprocess one image and its mask (all zeros when ``mask_path`` is None)."""
  raw = read_image(image_path)
  image = resize_and_crop_image(raw, resize, crop)
  if mask_path is None:
    mask = np.zeros((crop, crop), np.uint8)
  else:
    raw_mask = read_mask(mask_path)
    if resized_size(*raw_mask.shape, resize) != resized_size(*raw.shape[:2], resize):
      raise ImageReadError(
          f"mask {os.fspath(mask_path)} has size {raw_mask.shape[1]}x{raw_mask.shape[0]}, "
          f"which does not match image {os.fspath(image_path)} "
          f"({raw.shape[1]}x{raw.shape[0]}) after resizing"
      )
    mask = resize_and_crop_mask(raw_mask, resize, crop)
  return image, mask


def normalize(images):
  """uint8 images [..., 3] -> float32 ``(x / 255 - mean) / std`` (jax.numpy, jit-friendly)."""
  import jax.numpy as jnp  # here only: the rest of the data layer is numpy and PIL

  x = jnp.asarray(images).astype(jnp.float32) / jnp.float32(255.0)
  mean = jnp.asarray(IMAGENET_MEAN, dtype=jnp.float32)
  std = jnp.asarray(IMAGENET_STD, dtype=jnp.float32)
  return (x - mean) / std
