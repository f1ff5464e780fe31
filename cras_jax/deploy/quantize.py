"""INT8 by onnxruntime's static quantisation (QDQ, per-channel int8 weights, uint8
activations), calibrated on the images the caller gives: `to_int8` rewrites the graph exactly
first (`onnx_rewrites`) and quantises only the backbone's convolutions and activations, the nodes
that feed the adapter (`feature_nodes`)."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile

import numpy as np
import onnx

from cras_jax.base import errors
from cras_jax.deploy.onnx_rewrites import (
    INT8_OPS,
    feature_nodes,
    fold_conv_affine,
    relu_to_clip,
)

BATCH = 8  # images per call while calibrating and checking


@contextlib.contextmanager
def _quiet_quantizer():
  """The quantizer logs advice and progress at INFO/WARNING: not the export's output."""
  root = logging.getLogger()
  level = root.level
  root.setLevel(logging.ERROR)
  try:
    yield
  finally:
    root.setLevel(level)


class _Reader:
  """The calibration images as onnxruntime's CalibrationDataReader wants them: one feed per
  batch of `BATCH` images (the thresholds inputs are fed too; no quantised node reads them)."""

  def __init__(self, images: np.ndarray):
    self._feeds = iter(
        [
            {
                "images": np.ascontiguousarray(images[i : i + BATCH]),
                "image_threshold": np.asarray(0.0, np.float32),
                "pixel_threshold": np.asarray(0.0, np.float32),
            }
            for i in range(0, len(images), BATCH)
        ]
    )

  def get_next(self):
    return next(self._feeds, None)

  def __iter__(self):
    return self

  def __next__(self):
    item = self.get_next()
    if item is None:
      raise StopIteration
    return item


def to_int8(
    model: onnx.ModelProto, calibration: np.ndarray, backbone: str = ""
) -> tuple[onnx.ModelProto, dict]:
  """The model quantised to int8 (module doc), its activation ranges calibrated on
  `calibration` (uint8 crops [N, crop, crop, 3])."""
  from onnxruntime import quantization as q  # noqa: PLC0415 - export-time tooling only
  from onnxruntime.quantization.shape_inference import quant_pre_process  # noqa: PLC0415

  if not len(calibration):
    raise errors.UserValueError(
        "--precision=int8: the calibration set holds no images (the run's training split is "
        "empty, or --calibration_images=0): give --calibration_images >= 1 of a run with "
        "normal training images, or export --precision=fp16"
    )
  with tempfile.TemporaryDirectory(prefix="cras_jax_int8_") as tmp, _quiet_quantizer():
    src, pre, out = (os.path.join(tmp, f) for f in ("fp32.onnx", "pre.onnx", "int8.onnx"))
    onnx.save(model, src)
    try:
      quant_pre_process(src, pre, skip_symbolic_shape=True)
    except Exception as e:  # noqa: BLE001 - the tool's own error, named
      raise _no_int8(backbone, f"onnxruntime's pre-processing failed: {e}") from None
    prepared = onnx.load(pre)
    folded = fold_conv_affine(prepared)
    clips = relu_to_clip(prepared)
    nodes = feature_nodes(prepared)
    convs = [n.name for n in prepared.graph.node if n.op_type == "Conv" and n.name in nodes]
    if not convs:
      raise _no_int8(backbone, "its graph has no convolution before the adapter to quantise")
    onnx.save(prepared, pre)
    try:
      q.quantize_static(
          pre,
          out,
          _Reader(calibration),
          quant_format=q.QuantFormat.QDQ,
          op_types_to_quantize=list(INT8_OPS),
          nodes_to_quantize=nodes,
          per_channel=True,
          reduce_range=False,
          activation_type=q.QuantType.QUInt8,
          weight_type=q.QuantType.QInt8,
          calibrate_method=q.CalibrationMethod.MinMax,
      )
    except Exception as e:  # noqa: BLE001 - the tool's own error, named
      raise _no_int8(backbone, f"onnxruntime's quantizer failed: {e}") from None
    quantised = onnx.load(out)
  foreign = {n.domain for n in quantised.graph.node if n.domain not in ("", "ai.onnx")}
  if foreign:
    raise _no_int8(backbone, f"the quantizer wrote operators of domains {sorted(foreign)}")
  # the optimiser declares every domain it knows; the graph uses the standard one alone
  standard = [o for o in quantised.opset_import if o.domain in ("", "ai.onnx")]
  del quantised.opset_import[:]
  quantised.opset_import.extend(standard)
  if [o.version for o in standard] != [model.opset_import[0].version]:
    raise _no_int8(backbone, f"the quantizer changed the opset to {list(standard)}")
  info = {
      "tool": "onnxruntime.quantization.quantize_static",
      "format": "QDQ",
      "weights": "int8, symmetric, per output channel",
      "activations": "uint8, asymmetric, per tensor",
      "calibration_method": "MinMax",
      "reduce_range": False,
      "rewrites": {
          "quant_pre_process": "onnxruntime's basic optimisation (layout transposes removed)",
          "convolutions_folded": folded,
          "relu_as_clip": clips,
      },
      "quantised_nodes": len(nodes),
      "quantised_convolutions": len(convs),
      "kept_float32": "the adapter, the matching (class centres and nearest patch), the discriminator, the "
      "anomaly map's upsampling and smoothing, the normalisation and the thresholds",
  }
  return quantised, info


def _no_int8(backbone: str, why: str) -> errors.UserValueError:
  return errors.UserValueError(
      f"--precision=int8: the {backbone or 'model'} backbone cannot be quantised here ({why}); "
      f"export --precision=fp16 or fp32"
  )
