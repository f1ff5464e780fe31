"""What the jaxpr-to-ONNX converter (`onnx_graph`) is built on: the ONNX types of numpy dtypes,
the graph under construction (nodes, deduplicated initializers, the symbolic batch size and
shapes computed from it) and the small helpers its rules share."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from jax._src import core
from onnx import TensorProto, helper, numpy_helper

ONNX_TYPES = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.float64): TensorProto.DOUBLE,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.int8): TensorProto.INT8,
    np.dtype(np.bool_): TensorProto.BOOL,
}


class UnsupportedPrimitive(NotImplementedError):
  """A primitive (or a form of one) with no exact ONNX equivalent in this converter."""


def onnx_type(dtype) -> int:
  """The ONNX element type of a numpy dtype; an `UnsupportedPrimitive` naming a dtype without
  one here (e.g. bfloat16: runtimes lack most operators for it, so a bfloat16 model is traced
  in float32 for export, `onnx_export.graph_run`)."""
  dtype = np.dtype(dtype)
  if dtype not in ONNX_TYPES:
    raise UnsupportedPrimitive(
        f"a value of dtype {dtype} has no ONNX type in this converter (it writes "
        f"{', '.join(str(d) for d in ONNX_TYPES)})"
    )
  return ONNX_TYPES[dtype]


def np_dtype(aval) -> np.dtype:
  return np.dtype(aval.dtype)


def is_static(shape) -> bool:
  return all(core.is_constant_dim(d) for d in shape)


class Graph:
  """The ONNX graph under construction: nodes, initializers and the symbolic batch size."""

  def __init__(self, batch_source: str, batch_name: str):
    self.nodes: list[onnx.NodeProto] = []
    self.initializers: list[onnx.TensorProto] = []
    self._ids = itertools.count()
    self._consts: dict[Any, str] = {}
    self.batch_source = batch_source  # an input whose dimension 0 is the symbolic size
    self.batch_name = batch_name
    self._batch: str | None = None
    self._dims: dict[str, str] = {}
    self._keep: list[np.ndarray] = []  # the constants named by id: alive while the graph is

  def fresh(self, hint: str) -> str:
    return f"{hint}_{next(self._ids)}"

  def node(self, op: str, inputs: Sequence[str], **attrs) -> str:
    out = self.fresh(op.lower())
    self.nodes.append(helper.make_node(op, list(inputs), [out], name=out, **attrs))
    return out

  def const(self, value: np.ndarray, hint: str = "c") -> str:
    value = np.asarray(value)
    onnx_type(value.dtype)  # a dtype without one is named
    # small constants (shapes, axes, scalars) by content, so each is stored once; others by
    # identity (the same weight array named twice is one initializer)
    small = value.nbytes <= 1024
    key = (value.dtype.str, value.shape, value.tobytes()) if small else id(value)
    if key in self._consts:
      return self._consts[key]
    name = self.fresh(hint)
    self.initializers.append(numpy_helper.from_array(np.array(value, order="C"), name))
    self._consts[key] = name
    self._keep.append(value)
    return name

  def ints(self, values: Sequence[int]) -> str:
    return self.const(np.asarray(values, np.int64), "i")

  def batch(self) -> str:
    """int64 [1]: the batch size, read from the input's shape."""
    if self._batch is None:
      shape = self.node("Shape", [self.batch_source])
      self._batch = self.node("Slice", [shape, self.ints([0]), self.ints([1])])
    return self._batch

  def dim(self, d) -> str:
    """int64 [1] holding dimension `d` (an int, or a*b + c of the symbolic batch size b)."""
    if core.is_constant_dim(d):
      return self.ints([int(d)])
    key = str(d)
    if key not in self._dims:
      c = int(d._evaluate({self.batch_name: 0}))
      a = int(d._evaluate({self.batch_name: 1})) - c
      if int(d._evaluate({self.batch_name: 7})) != 7 * a + c:
        raise UnsupportedPrimitive(f"dimension {d} is not linear in {self.batch_name}")
      out = self.batch() if a == 1 else self.node("Mul", [self.batch(), self.ints([a])])
      self._dims[key] = out if c == 0 else self.node("Add", [out, self.ints([c])])
    return self._dims[key]

  def shape(self, dims) -> str:
    """int64 [rank] holding the shape `dims` (symbolic entries computed at run time)."""
    if is_static(dims):
      return self.ints([int(d) for d in dims])
    return self.node("Concat", [self.dim(d) for d in dims], axis=0)


def gather_fill(dtype: np.dtype):
  """JAX's fill value of an out-of-bounds gather: NaN, the minimum integer, or True."""
  if dtype.kind == "f":
    return np.nan
  if dtype.kind in "iu":
    return np.iinfo(dtype).min
  return True


def same_dim(a, b) -> bool:
  if core.is_constant_dim(a) and core.is_constant_dim(b):
    return int(a) == int(b)
  return not core.is_constant_dim(a) and not core.is_constant_dim(b) and str(a) == str(b)


def describe(eqn) -> str:
  shapes = ", ".join(str(getattr(v.aval, "str_short", lambda: v.aval)()) for v in eqn.invars)
  return f"{eqn.primitive.name}({shapes})"
