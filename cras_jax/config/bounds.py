"""Bounds on every size and scale of a config, and an estimate of a training step's memory.

The config check (`config_check`) asks these of every config before anything runs, so a value
that would exhaust the machine is refused up front with its reason, instead of hanging, dying
in C++ or failing after the feature pass: `bound_problems` (non-finite numbers anywhere, each
size and scale within a range that a step can use), `memory_problem` (an estimate of the
memory a training step needs at least, against the memory of the device it runs on).
"""

from __future__ import annotations

import math
import os

from cras_jax.base import schema

# field: (lowest, highest, why the highest). Sizes are integers, scales numbers.
SIZE_BOUNDS = {
    "data.resize": (1, 8192, "larger images than 8192 px do not fit a training batch"),
    "data.crop": (1, 8192, "larger crops than 8192 px do not fit a training batch"),
    "data.synthetic.image_size": (32, 4096, "the demo images are drawn in memory"),
    "data.synthetic.n_train": (1, 100_000, "the demo set is generated on this machine"),
    "data.synthetic.n_test_good": (1, 100_000, "the demo set is generated on this machine"),
    "data.synthetic.n_test_defect_per_type": (1, 100_000, "the demo set is generated here"),
    "model.patch_size": (1, 31, "a patch wider than 31 feature cells is the whole map"),
    "model.pre_embed_dim": (1, 16384, "the backbone features have at most 3072 channels"),
    "model.embed_dim": (1, 16384, "the heads' D x D layers would not fit in memory"),
    "model.adapter_layers": (1, 64, "deeper heads than 64 layers"),
    "model.disc_layers": (1, 64, "deeper heads than 64 layers"),
    "train.batch_size": (1, 65536, "no device holds such a batch"),
    "eval.batch_size": (1, 65536, "no device holds such a batch"),
    "train.epochs": (1, 1_000_000, "a run longer than a million epochs"),
    "train.keep_checkpoints": (1, 10_000, "each checkpoint holds the whole model"),
    "train.log_every": (1, 10**9, ""),
    "train.eval_every": (0, 1_000_000, ""),
    "train.checkpoint_every_steps": (0, 10**9, ""),
    "eval.num_heatmaps": (0, 100_000, "each heatmap is a PNG per class"),
    "data.max_image_pixels": (1, 2**31 - 1, "PIL decodes at most 2^31 pixels"),
}
SCALE_BOUNDS = {  # field: (low, strict, high, why)
    "train.lr_adapter": (0.0, True, 10.0, "a learning rate over 10 diverges at the first step"),
    "train.lr_disc": (0.0, True, 10.0, "a learning rate over 10 diverges at the first step"),
    "train.wd_adapter": (0.0, False, 10.0, "weight decay over 10 erases the weights"),
    "train.wd_disc": (0.0, False, 10.0, "weight decay over 10 erases the weights"),
    "model.noise_sigma": (0.0, False, 1000.0, "noise 1000x the features is all noise"),
    "model.dafs_beta": (0.0, False, 1000.0, "the DAFS weights are exp(-beta x d)"),
    "model.map_sigma": (
        0.0,
        True,
        256.0,
        "the smoothing kernel spans 8 sigma per side; beyond the image it only flattens the map",
    ),
    "data.max_aspect_ratio": (1.0, False, 10_000.0, ""),
    "eval.fpr_limit": (0.0, True, 1.0, "a false-positive rate is at most 1"),
}


_get = schema.lookup


def _walk(node, prefix=""):
  for k in node.keys():
    v = node[k]
    if hasattr(v, "keys"):
      yield from _walk(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v


def bound_problems(config) -> list[str]:
  """Non-finite numbers anywhere in `config`, and sizes or scales out of their bounds (each
  with its reason)."""
  p = []
  for field, v in _walk(config):
    values = v if isinstance(v, (tuple, list)) else (v,)
    if any(isinstance(x, float) and not math.isfinite(x) for x in values):
      p.append(f"{field}={v!r}: must be a finite number")
  for field, (low, high, why) in SIZE_BOUNDS.items():
    v = _get(config, field)
    if isinstance(v, int) and not isinstance(v, bool) and not low <= v <= high:
      p.append(
          f"{field}={v}: must be an integer from {low} to {high}" + (f" ({why})" if why else "")
      )
  for field, (low, strict, high, why) in SCALE_BOUNDS.items():
    v = _get(config, field)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
      if (v <= low if strict else v < low) or v > high:
        p.append(
            f"{field}={v!r}: must be {'>' if strict else '>='} {low:g} and <= {high:g}"
            + (f" ({why})" if why else "")
        )
  return p


def step_memory_bytes(config, num_classes: int) -> int:
  """A lower estimate of the memory a training step needs (bytes, float32): the heads'
  parameters with their two Adam moments, the batch's patch features through the adapter and
  the discriminator (normal and synthetic rows, kept for the backward pass), the per-image
  similarity to every class centre, and the backbone's first feature maps."""
  d, m, t = config.data, config.model, config.train
  b, dim, pre = t.batch_size, m.embed_dim, m.pre_embed_dim
  stride = 2 ** (min(m.levels) + 1)
  hw = math.ceil(d.crop / stride) ** 2
  params = pre * dim * m.adapter_layers + dim * dim * (2 + max(m.disc_layers - 1, 0))
  head = b * hw * max(dim, pre) * (2 + 2 * m.disc_layers)
  matching = b * hw * num_classes * hw
  backbone = b * d.crop * d.crop * 64  # the first stage's 64 channels at full resolution
  return 4 * (3 * params + head + matching + backbone)


def score_memory_bytes(config, num_classes: int, batch_size: int | None = None) -> int:
  """A lower estimate of the memory a scoring step needs (bytes, float32): the heads'
  parameters, the batch's patch features through the adapter and the discriminator (no
  backward pass), the similarity to every class centre, the backbone's first feature maps and
  the anomaly maps at the crop's size. batch_size: default `eval.batch_size`."""
  d, m = config.data, config.model
  b = batch_size or config.eval.batch_size
  dim, pre = m.embed_dim, m.pre_embed_dim
  hw = math.ceil(d.crop / 2 ** (min(m.levels) + 1)) ** 2
  params = pre * dim * m.adapter_layers + dim * dim * (2 + max(m.disc_layers - 1, 0))
  head = b * hw * max(dim, pre) * 2
  matching = b * hw * num_classes * hw
  images = b * d.crop * d.crop * (64 + 2)  # the first stage's 64 channels; map and smoothing
  return 4 * (params + head + matching + images)


def available_memory() -> tuple[int | None, str]:
  """(bytes, where) of the memory the step can use: the first device's limit, or the host's
  available memory on CPU."""
  import jax  # here only: the bounds above need no backend

  dev = jax.local_devices()[0]
  if dev.platform != "cpu":
    stats = dev.memory_stats() or {}
    if "bytes_limit" in stats:
      return int(stats["bytes_limit"]), f"{dev.device_kind} memory"
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024, "available host memory"
  except OSError:
    pass
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free host memory"
  except (ValueError, OSError):
    return None, ""


def memory_problem(config, num_classes: int, available: tuple[int | None, str] | None = None):
  """Why a training or a scoring step of `config` cannot fit (the estimate, the memory, the
  fix), or None. `num_classes`: the classes of the data (the configured ones, else an assumed
  15)."""
  have, where = available if available is not None else available_memory()
  if have is None:
    return None
  gib = 2**30
  need = step_memory_bytes(config, num_classes)
  if need > have:
    return (
        f"a training step needs at least {need / gib:.1f} GiB (batch {config.train.batch_size}, "
        f"crop {config.data.crop}, embed_dim {config.model.embed_dim}, {num_classes} classes) "
        f"but {where} is {have / gib:.1f} GiB: lower train.batch_size, data.crop or "
        f"model.embed_dim"
    )
  return scoring_memory_problem(config, num_classes, None, (have, where))


def scoring_memory_problem(
    config,
    num_classes: int,
    batch_size: int | None = None,
    available: tuple[int | None, str] | None = None,
    what: str = "eval.batch_size",
):
  """Why a scoring step of `config` at `batch_size` (default `eval.batch_size`; `what` names
  the setting in the message, e.g. predict's --batch_size) cannot fit, or None."""
  have, where = available if available is not None else available_memory()
  need = score_memory_bytes(config, num_classes, batch_size)
  if have is None or need <= have:
    return None
  b = batch_size or config.eval.batch_size
  return (
      f"{what}={b}: a scoring step needs at least {need / 2**30:.1f} GiB (crop "
      f"{config.data.crop}, {num_classes} classes) but {where} is {have / 2**30:.1f} GiB: "
      f"lower {what}"
  )
