"""Exact rewrites of an exported ONNX graph before it is compressed: the per-channel affine
after a convolution folded into it (`fold_conv_affine`), ReLU and ReLU6 as one Clip
(`relu_to_clip`), the nodes worth quantising (`feature_nodes`), weights stored in float16
(`to_fp16`), and the graph's normalisation constants (`normalisation_names`,
`set_initializer`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from cras_jax.base import errors

DEAD_CHANNEL = 1e-5  # a folded kernel's channel this much smaller than the layer's largest: zero
FP16_MAX = float(np.finfo(np.float16).max)
# quantised: the backbone's convolutions and their activations; the adapter's MatMul stays float32
# (quantising it flipped 3 of the demo's 120 test decisions instead of 1: docs/deploy.md)
INT8_OPS = ("Conv", "Clip")


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
  """A deep copy of `model` (the rewrites work in place)."""
  out = onnx.ModelProto()
  out.CopyFrom(model)
  return out


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
  out: dict[str, list[onnx.NodeProto]] = {}
  for node in graph.node:
    for name in node.input:
      out.setdefault(name, []).append(node)
  return out


def _initializers(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
  return {t.name: t for t in graph.initializer}


def _drop_nodes_and_unused(graph: onnx.GraphProto, dead: set[int]) -> None:
  keep = [n for n in graph.node if id(n) not in dead]
  del graph.node[:]
  graph.node.extend(keep)
  used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
  inits = [t for t in graph.initializer if t.name in used]
  del graph.initializer[:]
  graph.initializer.extend(inits)


def _per_channel(value: np.ndarray, channels: int) -> np.ndarray | None:
  """A constant broadcast against NCHW [b, channels, h, w] as one value per channel, or None."""
  if value.size == 1:
    return np.full(channels, float(value.reshape(-1)[0]))
  if value.shape in ((1, channels, 1, 1), (channels, 1, 1)):
    return value.reshape(-1).astype(np.float64)
  return None


def _index(model: onnx.ModelProto):
  """(graph, its initializers by name, each value's consumers, the graph's output names)."""
  g = model.graph
  return g, _initializers(g), _consumers(g), {o.name for o in g.output}


def fold_conv_affine(model: onnx.ModelProto) -> int:
  """Folds each chain of per-channel Sub/Mul/Add/Div by constants after a Conv (NCHW, its only
  consumer each time) into the Conv's kernel and bias; channels whose folded kernel is below
  `DEAD_CHANNEL` of the layer's largest are set to zero. Exact up to float rounding (and the
  dead channels' < 1e-5 share). -> the number of convolutions folded."""
  g, inits, cons, outputs = _index(model)
  dead: set[int] = set()
  folded = 0
  for conv in list(g.node):
    if conv.op_type != "Conv" or len(conv.input) < 2 or conv.input[1] not in inits:
      continue
    has_bias = len(conv.input) > 2 and conv.input[2] != ""
    if has_bias and conv.input[2] not in inits:
      continue
    w = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
    cout = w.shape[0]
    b = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if has_bias else None
    scale, shift, tail, chain = np.ones(cout), np.zeros(cout), conv.output[0], []
    while tail not in outputs:
      users = cons.get(tail, [])
      if len(users) != 1:
        break
      n = users[0]
      if n.op_type not in ("Sub", "Mul", "Add", "Div") or list(n.input[:1]) != [tail]:
        break
      if len(n.input) != 2 or n.input[1] not in inits:
        break
      c = _per_channel(numpy_helper.to_array(inits[n.input[1]]), cout)
      if c is None or (n.op_type == "Div" and not np.all(c)):
        break
      if n.op_type == "Sub":
        shift = shift - c
      elif n.op_type == "Add":
        shift = shift + c
      elif n.op_type == "Mul":
        scale, shift = scale * c, shift * c
      else:
        scale, shift = scale / c, shift / c
      chain.append(n)
      tail = n.output[0]
    if not chain:
      continue
    w = w * scale.reshape(-1, *[1] * (w.ndim - 1))
    largest = np.abs(w).reshape(cout, -1).max(axis=1)
    w[largest < DEAD_CHANNEL * largest.max()] = 0.0
    bias = (b if b is not None else np.zeros(cout)) * scale + shift
    wname, bname = f"{conv.name}_kernel_folded", f"{conv.name}_bias_folded"
    g.initializer.extend(
        [
            numpy_helper.from_array(w.astype(np.float32), wname),
            numpy_helper.from_array(bias.astype(np.float32), bname),
        ]
    )
    x = conv.input[0]
    del conv.input[:]
    conv.input.extend([x, wname, bname])
    conv.output[0] = tail
    dead.update(id(n) for n in chain)
    folded += 1
  _drop_nodes_and_unused(g, dead)
  return folded


def _float_scalar(inits: dict, name: str) -> float | None:
  if name not in inits:
    return None
  a = numpy_helper.to_array(inits[name])
  return float(a.reshape(-1)[0]) if a.size == 1 and a.dtype == np.float32 else None


def relu_to_clip(model: onnx.ModelProto) -> int:
  """Max(x, lo) [then Min(., hi)] of float32 scalar constants (ReLU, ReLU6) -> one Clip, which
  the quantizer fuses with the convolution before it. -> the number rewritten."""
  g, inits, cons, outputs = _index(model)
  dead: set[int] = set()
  done = 0
  for mx in list(g.node):
    if mx.op_type != "Max" or len(mx.input) != 2:
      continue
    consts = [_float_scalar(inits, i) for i in mx.input]
    if sum(c is not None for c in consts) != 1:
      continue
    lo = next(c for c in consts if c is not None)
    x = mx.input[consts.index(None)]
    hi, out = None, mx.output[0]
    users = cons.get(out, [])
    if len(users) == 1 and users[0].op_type == "Min" and out not in outputs:
      other = [i for i in users[0].input if i != out]
      if len(other) == 1 and _float_scalar(inits, other[0]) is not None:
        hi, out = _float_scalar(inits, other[0]), users[0].output[0]
        dead.add(id(users[0]))
    lo_name = f"{mx.name}_clip_min"
    g.initializer.append(numpy_helper.from_array(np.asarray(lo, np.float32), lo_name))
    inputs = [x, lo_name]
    if hi is not None:
      hi_name = f"{mx.name}_clip_max"
      g.initializer.append(numpy_helper.from_array(np.asarray(hi, np.float32), hi_name))
      inputs.append(hi_name)
    mx.CopyFrom(helper.make_node("Clip", inputs, [out], name=f"{mx.name}_clip"))
    done += 1
  _drop_nodes_and_unused(g, dead)
  return done


def feature_nodes(model: onnx.ModelProto, op_types: Sequence[str] = INT8_OPS) -> list[str]:
  """The nodes of `op_types` that feed the adapter's output: everything from the input up to and
  including the first MatMul with a constant matrix (the adapter; the graph is in topological
  order). Without one: every node of those types."""
  g = model.graph
  inits = _initializers(g)
  producer = {o: n for n in g.node for o in n.output}
  adapter = next((n for n in g.node if n.op_type == "MatMul" and n.input[1] in inits), None)
  if adapter is None:
    return [n.name for n in g.node if n.op_type in op_types]
  seen: set[str] = set()
  stack = [adapter]
  while stack:
    n = stack.pop()
    if n.name in seen:
      continue
    seen.add(n.name)
    stack.extend(producer[i] for i in n.input if i in producer)
  return [n.name for n in g.node if n.name in seen and n.op_type in op_types]


def to_fp16(model: onnx.ModelProto, backbone: str = "") -> tuple[onnx.ModelProto, dict]:
  """The model with its weights of two or more dimensions above 1 stored as float16, each cast to
  float32 by a Cast node in front of the graph. A weight beyond float16's range is refused."""
  model = copy_model(model)
  g = model.graph
  casts, tensors, converted, kept = [], [], 0, 0
  for t in g.initializer:
    a = numpy_helper.to_array(t)
    if a.dtype != np.float32 or sum(d > 1 for d in a.shape) < 2:
      tensors.append(t)
      kept += a.nbytes if a.dtype == np.float32 else 0
      continue
    big = float(np.abs(a).max()) if a.size else 0.0
    if big > FP16_MAX:
      raise errors.UserValueError(
          f"--precision=fp16: the {backbone or 'model'}'s weight {t.name} holds values up to "
          f"{big:.3g}, beyond float16's range ({FP16_MAX:.0f}): export --precision=fp32 or int8"
      )
    tensors.append(numpy_helper.from_array(a.astype(np.float16), f"{t.name}_fp16"))
    casts.append(
        helper.make_node(
            "Cast", [f"{t.name}_fp16"], [t.name], to=onnx.TensorProto.FLOAT, name=f"{t.name}_cast"
        )
    )
    converted += 1
  del g.initializer[:]
  g.initializer.extend(tensors)
  nodes = casts + list(g.node)
  del g.node[:]
  g.node.extend(nodes)
  info = {
      "weights": f"{converted} weights of two or more dimensions above 1 stored as float16, "
      "cast to float32 in the graph; vectors and scalars float32",
      "compute": "float32 (the runtimes fold the casts)",
  }
  return model, info


def normalisation_names(model: onnx.ModelProto, loc, scale) -> tuple[str, str] | None:
  """The names of the initializers holding the per-class normalisation (exactly `loc` and
  `scale` as float32 [K], each read only by Gather/GatherND nodes: indexed by the matched
  class), or None when they cannot be told apart from other constants."""
  cons = _consumers(model.graph)
  names = []
  for value in (loc, scale):
    want = np.asarray(value, np.float32)
    found = [
        t.name
        for t in model.graph.initializer
        if tuple(t.dims) == want.shape
        and t.data_type == onnx.TensorProto.FLOAT
        and np.array_equal(numpy_helper.to_array(t), want)
        and all(n.op_type in ("Gather", "GatherND") for n in cons.get(t.name, [None]) if n)
        and cons.get(t.name)
    ]
    if len(found) != 1:
      return None
    names.append(found[0])
  return (names[0], names[1]) if names[0] != names[1] else None


def set_initializer(model: onnx.ModelProto, name: str, value) -> None:
  """Replaces initializer `name`'s value (same shape and dtype)."""
  for t in model.graph.initializer:
    if t.name == name:
      old = numpy_helper.to_array(t)
      new = np.asarray(value, old.dtype).reshape(old.shape)
      t.CopyFrom(numpy_helper.from_array(new, name))
      return
  raise KeyError(name)
