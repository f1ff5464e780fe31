"""The converter's rules for elementwise, shape and reduction primitives (`onnx_graph`):
one method `_<primitive>(eqn, ins, **params)` each, mixed into its converter, which supplies
`g` (the `onnx_base.Graph`) and `name` (a value's tensor name)."""

from __future__ import annotations

import numpy as np
from jax._src import core
from onnx import TensorProto

from cras_jax.deploy.onnx_base import (
    UnsupportedPrimitive,
    describe,
    is_static,
    np_dtype,
    onnx_type,
    same_dim,
)


class ElementwiseShapeRules:
  """Elementwise, shape and reduction primitives."""

  # --------------------------------------------------------------------------- elementwise

  def _binary(self, op, eqn, ins):
    a, b = (self.name(x, v.aval) for x, v in zip(ins, eqn.invars))
    return self.g.node(op, [a, b])

  def _ne(self, eqn, ins):
    return self.g.node("Not", [self._binary("Equal", eqn, ins)])

  def _and(self, eqn, ins):
    kind = np_dtype(eqn.outvars[0].aval)
    return self._binary("And" if kind == np.bool_ else "BitwiseAnd", eqn, ins)

  def _or(self, eqn, ins):
    kind = np_dtype(eqn.outvars[0].aval)
    return self._binary("Or" if kind == np.bool_ else "BitwiseOr", eqn, ins)

  def _not(self, eqn, ins):
    kind = np_dtype(eqn.outvars[0].aval)
    return self.g.node("Not" if kind == np.bool_ else "BitwiseNot", [self.name(ins[0])])

  def _rsqrt(self, eqn, ins, **_):
    return self.g.node("Reciprocal", [self.g.node("Sqrt", [self.name(ins[0])])])

  def _square(self, eqn, ins):
    x = self.name(ins[0])
    return self.g.node("Mul", [x, x])

  def _integer_pow(self, eqn, ins, y):
    x = self.name(ins[0])
    if y == 0:
      return self._like(eqn, 1)
    out = x
    for _ in range(abs(y) - 1):
      out = self.g.node("Mul", [out, x])
    return out if y > 0 else self.g.node("Reciprocal", [out])

  def _like(self, eqn, value):
    aval = eqn.outvars[0].aval
    one = self.g.const(np.asarray(value, np_dtype(aval)))
    return self.g.node("Expand", [one, self.g.shape(aval.shape)])

  def _is_finite(self, eqn, ins):
    x = self.name(ins[0])
    bad = self.g.node("Or", [self.g.node("IsNaN", [x]), self.g.node("IsInf", [x])])
    return self.g.node("Not", [bad])

  def _select_n(self, eqn, ins):
    if len(ins) != 3:
      raise UnsupportedPrimitive(f"select_n with {len(ins) - 1} cases ({describe(eqn)})")
    pred = self.name(ins[0], eqn.invars[0].aval)
    if np_dtype(eqn.invars[0].aval) != np.bool_:
      pred = self.g.node("Cast", [pred], to=TensorProto.BOOL)
    false, true = (self.name(x, v.aval) for x, v in zip(ins[1:], eqn.invars[1:]))
    return self.g.node("Where", [pred, true, false])

  def _clamp(self, eqn, ins):
    lo, x, hi = (self.name(x, v.aval) for x, v in zip(ins, eqn.invars))
    return self.g.node("Max", [self.g.node("Min", [x, hi]), lo])

  def _convert_element_type(self, eqn, ins, new_dtype, **_):
    x = self.name(ins[0], eqn.invars[0].aval)
    if np.dtype(new_dtype) == np_dtype(eqn.invars[0].aval):
      return x
    return self.g.node("Cast", [x], to=onnx_type(new_dtype))

  # --------------------------------------------------------------------------- shapes

  def _reshape(self, eqn, ins, new_sizes, dimensions=None, **_):
    if dimensions is not None:
      raise UnsupportedPrimitive(f"reshape with dimensions ({describe(eqn)})")
    return self.g.node("Reshape", [self.name(ins[0]), self.g.shape(new_sizes)])

  def _squeeze(self, eqn, ins, dimensions):
    return self.g.node("Squeeze", [self.name(ins[0]), self.g.ints(dimensions)])

  def _expand_dims(self, eqn, ins, dimensions):
    return self.g.node("Unsqueeze", [self.name(ins[0]), self.g.ints(dimensions)])

  def _transpose(self, eqn, ins, permutation):
    return self.g.node("Transpose", [self.name(ins[0])], perm=list(permutation))

  def _broadcast_in_dim(self, eqn, ins, shape, broadcast_dimensions, **_):
    x = self.name(ins[0], eqn.invars[0].aval)
    missing = [d for d in range(len(shape)) if d not in broadcast_dimensions]
    if missing:
      x = self.g.node("Unsqueeze", [x, self.g.ints(missing)])
    in_shape = list(eqn.invars[0].aval.shape)
    placed = [1] * len(shape)
    for i, d in enumerate(broadcast_dimensions):
      placed[d] = in_shape[i]
    if is_static(shape) and is_static(placed) and list(map(int, placed)) == list(map(int, shape)):
      return x
    return self.g.node("Expand", [x, self.g.shape(shape)])

  def _concatenate(self, eqn, ins, dimension):
    names = [self.name(x, v.aval) for x, v in zip(ins, eqn.invars)]
    return self.g.node("Concat", names, axis=int(dimension))

  def _stack(self, eqn, ins, axis):
    axes = self.g.ints([int(axis)])
    parts = [
        self.g.node("Unsqueeze", [self.name(x, v.aval), axes]) for x, v in zip(ins, eqn.invars)
    ]
    return self.g.node("Concat", parts, axis=int(axis))

  def _pad(self, eqn, ins, padding_config):
    if any(interior for _, _, interior in padding_config):
      raise UnsupportedPrimitive(f"pad with interior padding ({describe(eqn)})")
    lo = [int(p[0]) for p in padding_config]
    hi = [int(p[1]) for p in padding_config]
    x = self.name(ins[0], eqn.invars[0].aval)
    value = self.name(ins[1], eqn.invars[1].aval)
    return self.g.node("Pad", [x, self.g.ints(lo + hi), value], mode="constant")

  def _slice(self, eqn, ins, start_indices, limit_indices, strides):
    shape = eqn.invars[0].aval.shape
    strides = strides or (1,) * len(shape)
    axes, starts, ends, steps = [], [], [], []
    for ax, (s, e, st, d) in enumerate(zip(start_indices, limit_indices, strides, shape)):
      if core.is_constant_dim(s) and int(s) == 0 and int(st) == 1 and same_dim(e, d):
        continue
      if not (core.is_constant_dim(s) and core.is_constant_dim(e)):
        raise UnsupportedPrimitive(f"slice with symbolic bounds ({describe(eqn)})")
      axes.append(ax)
      starts.append(int(s))
      ends.append(int(e))
      steps.append(int(st))
    x = self.name(ins[0], eqn.invars[0].aval)
    if not axes:
      return x
    return self.g.node(
        "Slice", [x, self.g.ints(starts), self.g.ints(ends), self.g.ints(axes), self.g.ints(steps)]
    )

  def _dynamic_slice(self, eqn, ins, slice_sizes):
    shape = eqn.invars[0].aval.shape
    starts = ins[1:]
    if not all(isinstance(s, np.ndarray) for s in starts):
      raise UnsupportedPrimitive(f"dynamic_slice with computed starts ({describe(eqn)})")
    lo, hi = [], []
    for s, size, d in zip(starts, slice_sizes, shape):
      if same_dim(size, d):
        lo.append(0)
        hi.append(d)
        continue
      start = int(np.clip(int(s), 0, int(d) - int(size)))  # XLA clamps the start
      lo.append(start)
      hi.append(start + int(size))
    return self._slice(eqn, ins[:1], lo, hi, None)

  # --------------------------------------------------------------------------- reductions

  def _reduce(self, op, eqn, ins):
    x = self.name(ins[0], eqn.invars[0].aval)
    return self.g.node(op, [x, self.g.ints(eqn.params["axes"])], keepdims=0)

  def _argmax(self, eqn, ins, axes, index_dtype):
    return self._arg("ArgMax", ins, axes, index_dtype)

  def _argmin(self, eqn, ins, axes, index_dtype):
    return self._arg("ArgMin", ins, axes, index_dtype)

  def _arg(self, op, ins, axes, index_dtype):
    (axis,) = axes
    out = self.g.node(op, [self.name(ins[0])], axis=int(axis), keepdims=0, select_last_index=0)
    return self.g.node("Cast", [out], to=onnx_type(index_dtype))
