"""The compressed ONNX exports' graph rewrites on small graphs (exact folds, the float16 storage
rule, the refusals) and run_onnx's rule for compressed files and runtimes; no trained run."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from cras_jax.base import errors
from cras_jax.deploy import onnx_rewrites, quantize, run_onnx

RNG = np.random.default_rng(0)


def _conv_bn_relu6() -> onnx.ModelProto:
  """x [b, 3, 8, 8] -> Conv (4 channels, channel 2 dead) -> Sub/Mul/Add per channel (a folded
  BatchNorm) -> Max(0) -> Min(6), then a Conv followed by a Max(0) alone (ReLU)."""
  w = RNG.normal(size=(4, 3, 3, 3)).astype(np.float32)
  w[2] *= 1e-9  # a dead channel: BatchNorm's gamma ~ 0
  w2 = RNG.normal(size=(2, 4, 1, 1)).astype(np.float32)
  consts = {
      "w": w,
      "mean": RNG.normal(size=(1, 4, 1, 1)).astype(np.float32),
      "scale": RNG.uniform(0.5, 2, size=(1, 4, 1, 1)).astype(np.float32),
      "shift": RNG.normal(size=(1, 4, 1, 1)).astype(np.float32),
      "zero": np.asarray(0, np.float32),
      "six": np.asarray(6, np.float32),
      "w2": w2,
  }
  nodes = [
      helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
      helper.make_node("Sub", ["c", "mean"], ["s"], name="sub"),
      helper.make_node("Mul", ["s", "scale"], ["m"], name="mul"),
      helper.make_node("Add", ["m", "shift"], ["a"], name="add"),
      helper.make_node("Max", ["zero", "a"], ["r"], name="max"),
      helper.make_node("Min", ["six", "r"], ["r6"], name="min"),
      helper.make_node("Conv", ["r6", "w2"], ["c2"], name="conv2"),
      helper.make_node("Max", ["c2", "zero"], ["y"], name="relu"),
  ]
  graph = helper.make_graph(
      nodes,
      "g",
      [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, 8, 8])],
      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 2, 8, 8])],
      [numpy_helper.from_array(v, k) for k, v in consts.items()],
  )
  return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
  session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
  return session.run(None, {"x": x})[0]


def test_folding_the_affine_and_relu6_as_clip_are_exact():
  model = _conv_bn_relu6()
  x = RNG.normal(size=(2, 3, 8, 8)).astype(np.float32)
  want = _run(model, x)
  assert onnx_rewrites.fold_conv_affine(model) == 1
  assert onnx_rewrites.relu_to_clip(model) == 2
  assert [n.op_type for n in model.graph.node] == ["Conv", "Clip", "Conv", "Clip"]
  onnx.checker.check_model(model)
  np.testing.assert_allclose(_run(model, x), want, rtol=0, atol=1e-5 * np.abs(want).max())
  inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
  kernel = inits[model.graph.node[0].input[1]]
  assert not kernel[2].any() and kernel[[0, 1, 3]].all()  # the dead channel zeroed, no other
  assert onnx_rewrites.feature_nodes(model) == ["conv", "max_clip", "conv2", "relu_clip"]


def test_fp16_stores_matrices_in_half_keeps_vectors_and_refuses_beyond_its_range():
  model = _conv_bn_relu6()
  half, info = onnx_rewrites.to_fp16(model, "tiny")
  types = {t.name: t.data_type for t in half.graph.initializer}
  assert types["w_fp16"] == types["w2_fp16"] == TensorProto.FLOAT16
  assert {types[k] for k in ("mean", "scale", "shift", "zero", "six")} == {TensorProto.FLOAT}
  assert "stored as float16" in info["weights"]
  x = RNG.normal(size=(1, 3, 8, 8)).astype(np.float32)
  want = _run(model, x)
  np.testing.assert_allclose(_run(half, x), want, rtol=0, atol=2e-3 * np.abs(want).max())
  big = _conv_bn_relu6()
  big.graph.initializer[0].CopyFrom(
      numpy_helper.from_array(np.full((4, 3, 3, 3), 1e5, np.float32), "w")
  )
  with pytest.raises(errors.UserValueError, match=r"--precision=fp16.*tiny.*'?w'?.*float16"):
    onnx_rewrites.to_fp16(big, "tiny")


def test_int8_needs_calibration_images():
  with pytest.raises(errors.UserValueError, match="calibration set holds no images"):
    quantize.to_int8(_conv_bn_relu6(), np.zeros((0, 8, 8, 3), np.uint8), "tiny")


def _meta(runtimes: dict | None, precision: str = "int8") -> dict:
  meta = {"precision": precision}
  if runtimes is not None:
    meta["compression"] = {"runtimes": runtimes}
  return meta


def test_a_compressed_file_runs_only_on_the_runtimes_its_export_checked():
  run_onnx.check_runtime({}, "openvino", "m.onnx")  # fp32: any runtime
  ok = {"onnxruntime": {"verified": True}}
  run_onnx.check_runtime(_meta(ok), "onnxruntime", "m.onnx")
  with pytest.raises(run_onnx.ExportError) as e:  # not installed at export
    run_onnx.check_runtime(_meta(ok), "openvino", "m.onnx")
  assert "m.onnx" in str(e.value) and "int8 export cannot be scored with openvino" in str(e.value)
  assert "never checked" in str(e.value) and "--runtime=onnxruntime" in str(e.value)
  bad = {**ok, "openvino": {"verified": False, "reason": "at export its decisions differed"}}
  with pytest.raises(run_onnx.ExportError, match="decisions differed.*--precision=fp32"):
    run_onnx.check_runtime(_meta(bad, "fp16"), "openvino", "m.onnx")


def test_int8_refuses_a_graph_without_a_convolution_naming_the_backbone():
  w = numpy_helper.from_array(RNG.normal(size=(4, 2)).astype(np.float32), "w")
  graph = helper.make_graph(
      [helper.make_node("MatMul", ["x", "w"], ["y"], name="dense")],
      "g",
      [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 2])],
      [w],
  )
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
  images = np.zeros((2, 8, 8, 3), np.uint8)
  with pytest.raises(errors.UserValueError, match=r"--precision=int8: the mlp backbone.*no conv"):
    quantize.to_int8(model, images, "mlp")
