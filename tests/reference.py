"""Shared pieces of the independent references used by several test files."""

import numpy as np

IMAGENET_MEAN = np.float32([0.485, 0.456, 0.406])
IMAGENET_STD = np.float32([0.229, 0.224, 0.225])


def imagenet_input(img: np.ndarray, short: int = 256, crop: int = 224) -> np.ndarray:
  """Classic ImageNet evaluation input (PIL): shorter side to `short`, centre crop, normalise."""
  from PIL import Image

  im = Image.fromarray(img).convert("RGB")
  w, h = im.size
  s = short / min(w, h)
  im = im.resize((round(w * s), round(h * s)), Image.BILINEAR)
  w, h = im.size
  left, top = (w - crop) // 2, (h - crop) // 2
  x = np.asarray(im.crop((left, top, left + crop, top + crop)), np.float32) / 255.0
  return ((x - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)


def randomise_batchnorm(bn, generator) -> None:
  """Random affine parameters and running statistics for a torch BatchNorm2d, so that
  inference-mode BatchNorm matters in a parity test (call under torch.no_grad())."""
  import torch

  n = bn.num_features
  bn.weight.copy_(0.5 + torch.rand(n, generator=generator))
  bn.bias.copy_(0.1 * torch.randn(n, generator=generator))
  bn.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
  bn.running_var.copy_(0.5 + torch.rand(n, generator=generator))
  bn.num_batches_tracked.fill_(7)
