"""A jaxpr as an ONNX graph: JAX's primitives mapped one by one to ONNX operators.

`to_onnx(fn, args, ...)` traces `fn` with `jax.make_jaxpr` (the batch dimension symbolic, so
the graph takes any batch size), folds every equation whose inputs are all known (weights,
literals, `iota`s: their results become initializers) and writes each remaining equation as
ONNX nodes. The map is docs/deploy.md's table; a primitive outside it raises
`UnsupportedPrimitive` naming it (nothing is approximated). Layout: the graph keeps JAX's
layout (NHWC); a convolution or pooling transposes into ONNX's NCHW and back (a runtime's
optimiser removes the pairs that cancel).
"""

from __future__ import annotations

import itertools
import string
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import onnx
from jax._src import core
from onnx import TensorProto, helper, numpy_helper

OPSET = 18

_ONNX_TYPES = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.float64): TensorProto.DOUBLE,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.int8): TensorProto.INT8,
    np.dtype(np.bool_): TensorProto.BOOL,
}

# Elementwise primitives with one ONNX operator of the same meaning.
_UNARY = {
    "neg": "Neg",
    "abs": "Abs",
    "sqrt": "Sqrt",
    "exp": "Exp",
    "log": "Log",
    "tanh": "Tanh",
    "logistic": "Sigmoid",
    "erf": "Erf",
    "floor": "Floor",
    "ceil": "Ceil",
    "sign": "Sign",
    "sin": "Sin",
    "cos": "Cos",
}
_BINARY = {
    "add": "Add",
    "sub": "Sub",
    "mul": "Mul",
    "div": "Div",
    "max": "Max",
    "min": "Min",
    "pow": "Pow",
    "lt": "Less",
    "le": "LessOrEqual",
    "gt": "Greater",
    "ge": "GreaterOrEqual",
    "eq": "Equal",
}
_REDUCE = {
    "reduce_sum": "ReduceSum",
    "reduce_max": "ReduceMax",
    "reduce_min": "ReduceMin",
    "reduce_prod": "ReduceProd",
}
# Calls whose body is inlined.
_CALLS = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
}
_IDENTITY = {"copy", "copy_p", "reduce_precision", "optimization_barrier"}
# A folded result may be this much larger than its inputs (broadcasts of weights are left to
# the runtime, not stored).
_FOLD_GROWTH, _FOLD_FREE = 4, 1 << 16


class UnsupportedPrimitive(NotImplementedError):
  """A primitive (or a form of one) with no exact ONNX equivalent in this converter."""


def _np_dtype(aval) -> np.dtype:
  return np.dtype(aval.dtype)


def _is_static(shape) -> bool:
  return all(core.is_constant_dim(d) for d in shape)


class _Graph:
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
    if value.dtype not in _ONNX_TYPES:
      raise UnsupportedPrimitive(f"a constant of dtype {value.dtype} has no ONNX type here")
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
    if _is_static(dims):
      return self.ints([int(d) for d in dims])
    return self.node("Concat", [self.dim(d) for d in dims], axis=0)


class _Converter:

  def __init__(self, graph: _Graph):
    self.g = graph

  # --------------------------------------------------------------------------- values

  def name(self, v, aval=None) -> str:
    """The ONNX tensor name of a value (a constant becomes an initializer)."""
    if isinstance(v, str):
      return v
    arr = np.asarray(v)
    if aval is not None and arr.dtype != _np_dtype(aval):
      arr = arr.astype(_np_dtype(aval))
    return self.g.const(arr)

  def read(self, env, var):
    if isinstance(var, core.Literal):
      return np.asarray(var.val, dtype=_np_dtype(var.aval))
    return env[var]

  # --------------------------------------------------------------------------- jaxprs

  def run(self, jaxpr: core.Jaxpr, consts, args) -> list:
    env: dict = {}
    for var, c in zip(jaxpr.constvars, consts):
      env[var] = np.asarray(c)
    for var, a in zip(jaxpr.invars, args):
      env[var] = a
    for eqn in jaxpr.eqns:
      ins = [self.read(env, v) for v in eqn.invars]
      outs = self.eqn(eqn, ins)
      for var, o in zip(eqn.outvars, outs):
        env[var] = o
    return [self.read(env, v) for v in jaxpr.outvars]

  def eqn(self, eqn, ins) -> list:
    prim = eqn.primitive.name
    if prim in _CALLS:
      closed = eqn.params[_CALLS[prim]]  # a function of all the inputs
      inner = closed.jaxpr if hasattr(closed, "jaxpr") else closed
      consts = closed.consts if hasattr(closed, "consts") else []
      return self.run(inner, consts, ins)
    if self._foldable(eqn, ins):
      with jax.default_device(jax.devices("cpu")[0]):
        out = eqn.primitive.bind(*[jnp.asarray(x) for x in ins], **eqn.params)
      outs = out if eqn.primitive.multiple_results else [out]
      return [np.asarray(o) for o in outs]
    rule = getattr(self, f"_{prim}", None)
    if rule is None:
      if prim in _UNARY:
        return [self.g.node(_UNARY[prim], [self.name(ins[0])])]
      if prim in _BINARY:
        return [self._binary(_BINARY[prim], eqn, ins)]
      if prim in _REDUCE:
        return [self._reduce(_REDUCE[prim], eqn, ins)]
      if prim in _IDENTITY:
        return [self.name(x, v.aval) for x, v in zip(ins, eqn.invars)]
      raise UnsupportedPrimitive(
          f"no ONNX form for the JAX primitive {prim!r} ({_describe(eqn)}); "
          f"see docs/deploy.md for the primitives that convert"
      )
    out = rule(eqn, ins, **eqn.params)
    return out if isinstance(out, list) else [out]

  def _foldable(self, eqn, ins) -> bool:
    if not all(isinstance(x, np.ndarray) for x in ins):
      return False
    if not all(_is_static(v.aval.shape) for v in eqn.outvars):
      return False
    size_in = sum(x.size for x in ins)
    size_out = sum(int(np.prod(v.aval.shape)) for v in eqn.outvars)
    return size_out <= max(_FOLD_FREE, _FOLD_GROWTH * size_in)

  # --------------------------------------------------------------------------- elementwise

  def _binary(self, op, eqn, ins):
    a, b = (self.name(x, v.aval) for x, v in zip(ins, eqn.invars))
    return self.g.node(op, [a, b])

  def _ne(self, eqn, ins):
    return self.g.node("Not", [self._binary("Equal", eqn, ins)])

  def _and(self, eqn, ins):
    kind = _np_dtype(eqn.outvars[0].aval)
    return self._binary("And" if kind == np.bool_ else "BitwiseAnd", eqn, ins)

  def _or(self, eqn, ins):
    kind = _np_dtype(eqn.outvars[0].aval)
    return self._binary("Or" if kind == np.bool_ else "BitwiseOr", eqn, ins)

  def _not(self, eqn, ins):
    kind = _np_dtype(eqn.outvars[0].aval)
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
    one = self.g.const(np.asarray(value, _np_dtype(aval)))
    return self.g.node("Expand", [one, self.g.shape(aval.shape)])

  def _is_finite(self, eqn, ins):
    x = self.name(ins[0])
    bad = self.g.node("Or", [self.g.node("IsNaN", [x]), self.g.node("IsInf", [x])])
    return self.g.node("Not", [bad])

  def _select_n(self, eqn, ins):
    if len(ins) != 3:
      raise UnsupportedPrimitive(f"select_n with {len(ins) - 1} cases ({_describe(eqn)})")
    pred = self.name(ins[0], eqn.invars[0].aval)
    if _np_dtype(eqn.invars[0].aval) != np.bool_:
      pred = self.g.node("Cast", [pred], to=TensorProto.BOOL)
    false, true = (self.name(x, v.aval) for x, v in zip(ins[1:], eqn.invars[1:]))
    return self.g.node("Where", [pred, true, false])

  def _clamp(self, eqn, ins):
    lo, x, hi = (self.name(x, v.aval) for x, v in zip(ins, eqn.invars))
    return self.g.node("Max", [self.g.node("Min", [x, hi]), lo])

  def _convert_element_type(self, eqn, ins, new_dtype, **_):
    x = self.name(ins[0], eqn.invars[0].aval)
    if np.dtype(new_dtype) == _np_dtype(eqn.invars[0].aval):
      return x
    return self.g.node("Cast", [x], to=_ONNX_TYPES[np.dtype(new_dtype)])

  # --------------------------------------------------------------------------- shapes

  def _reshape(self, eqn, ins, new_sizes, dimensions=None, **_):
    if dimensions is not None:
      raise UnsupportedPrimitive(f"reshape with dimensions ({_describe(eqn)})")
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
    if _is_static(shape) and _is_static(placed) and list(map(int, placed)) == list(map(int, shape)):
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
      raise UnsupportedPrimitive(f"pad with interior padding ({_describe(eqn)})")
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
      if core.is_constant_dim(s) and int(s) == 0 and int(st) == 1 and _same_dim(e, d):
        continue
      if not (core.is_constant_dim(s) and core.is_constant_dim(e)):
        raise UnsupportedPrimitive(f"slice with symbolic bounds ({_describe(eqn)})")
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
      raise UnsupportedPrimitive(f"dynamic_slice with computed starts ({_describe(eqn)})")
    lo, hi = [], []
    for s, size, d in zip(starts, slice_sizes, shape):
      if _same_dim(size, d):
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
    return self.g.node("Cast", [out], to=_ONNX_TYPES[np.dtype(index_dtype)])

  # --------------------------------------------------------------------------- linear algebra

  def _dot_general(self, eqn, ins, dimension_numbers, preferred_element_type=None, **_):
    (lc, rc), (lb, rb) = dimension_numbers
    lhs, rhs = ins
    la, ra = eqn.invars[0].aval, eqn.invars[1].aval
    nl, nr = len(la.shape), len(ra.shape)
    out_dtype = _np_dtype(eqn.outvars[0].aval)
    if not lb and len(lc) == 1 and lc[0] == nl - 1 and nr == 2 and len(rc) == 1:
      # x @ W (or W^T): MatMul, the weight transposed once here when it is a constant.
      if rc[0] == 1:
        rhs = (
            rhs.T.copy()
            if isinstance(rhs, np.ndarray)
            else self.g.node("Transpose", [rhs], perm=[1, 0])
        )
      out = self.g.node("MatMul", [self.name(lhs, la), self.name(rhs, ra)])
    else:
      letters = iter(string.ascii_letters)
      lhs_l = [next(letters) for _ in range(nl)]
      rhs_l = [next(letters) for _ in range(nr)]
      for a, b in zip(lc, rc):
        rhs_l[b] = lhs_l[a]
      for a, b in zip(lb, rb):
        rhs_l[b] = lhs_l[a]
      batch = [lhs_l[a] for a in lb]
      free_l = [lhs_l[a] for a in range(nl) if a not in lc and a not in lb]
      free_r = [rhs_l[b] for b in range(nr) if b not in rc and b not in rb]
      equation = f"{''.join(lhs_l)},{''.join(rhs_l)}->{''.join(batch + free_l + free_r)}"
      out = self.g.node("Einsum", [self.name(lhs, la), self.name(rhs, ra)], equation=equation)
    if out_dtype != _np_dtype(la):
      out = self.g.node("Cast", [out], to=_ONNX_TYPES[out_dtype])
    return out

  def _conv_general_dilated(
      self,
      eqn,
      ins,
      window_strides,
      padding,
      lhs_dilation,
      rhs_dilation,
      dimension_numbers,
      feature_group_count,
      batch_group_count,
      preferred_element_type=None,
      **_,
  ):
    if any(d != 1 for d in lhs_dilation) or batch_group_count != 1:
      raise UnsupportedPrimitive(f"transposed or batch-grouped convolution ({_describe(eqn)})")
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    x = self.g.node("Transpose", [self.name(ins[0], eqn.invars[0].aval)], perm=list(lhs_spec))
    w = ins[1]
    if isinstance(w, np.ndarray):
      w = self.g.const(np.ascontiguousarray(np.transpose(w, rhs_spec)), "kernel")
    else:
      w = self.g.node("Transpose", [w], perm=list(rhs_spec))
    pads = [int(p[0]) for p in padding] + [int(p[1]) for p in padding]
    y = self.g.node(
        "Conv",
        [x, w],
        strides=[int(s) for s in window_strides],
        dilations=[int(d) for d in rhs_dilation],
        pads=pads,
        group=int(feature_group_count),
    )
    return self.g.node("Transpose", [y], perm=[int(i) for i in np.argsort(out_spec)])

  def _reduce_window_max(self, eqn, ins, **p):
    return self._pool("MaxPool", eqn, ins, **p)

  def _reduce_window_sum(self, eqn, ins, **p):
    pooled = self._pool("AveragePool", eqn, ins, **p)
    size = int(np.prod(p["window_dimensions"]))
    scale = self.g.const(np.asarray(size, _np_dtype(eqn.outvars[0].aval)))
    return self.g.node("Mul", [pooled, scale])

  def _pool(
      self, op, eqn, ins, window_dimensions, window_strides, padding, base_dilation, window_dilation
  ):
    # The window runs over the spatial axes; batch and channel axes have windows of 1.
    spatial = [i for i, w in enumerate(window_dimensions) if w != 1 or window_strides[i] != 1]
    rank = len(window_dimensions)
    others = [i for i in range(rank) if i not in spatial]
    if (
        any(d != 1 for d in base_dilation)
        or len(others) != 2
        or any(padding[i] != (0, 0) for i in others)
    ):
      raise UnsupportedPrimitive(f"{eqn.primitive.name} of this form ({_describe(eqn)})")
    perm = others + spatial
    x = self.g.node("Transpose", [self.name(ins[0])], perm=perm)
    attrs = dict(
        kernel_shape=[int(window_dimensions[i]) for i in spatial],
        strides=[int(window_strides[i]) for i in spatial],
        pads=[int(padding[i][0]) for i in spatial] + [int(padding[i][1]) for i in spatial],
    )
    if op == "MaxPool":
      attrs["dilations"] = [int(window_dilation[i]) for i in spatial]
    else:
      if any(window_dilation[i] != 1 for i in spatial):
        raise UnsupportedPrimitive(f"dilated window sum ({_describe(eqn)})")
      attrs["count_include_pad"] = 1
    y = self.g.node(op, [x], **attrs)
    return self.g.node("Transpose", [y], perm=[int(i) for i in np.argsort(perm)])

  # --------------------------------------------------------------------------- gathers

  def _gather(self, eqn, ins, dimension_numbers, slice_sizes, mode, fill_value=None, **_):
    operand, indices = ins
    oshape = eqn.invars[0].aval.shape
    dn = dimension_numbers
    mode_name = str(mode).rsplit(".", 1)[-1]
    taken = self._take(eqn, operand, indices, dn, slice_sizes, mode_name)
    if taken is not None:
      return taken
    if isinstance(indices, np.ndarray) and not dn.operand_batching_dims:
      return self._static_gather(eqn, operand, indices, dn, slice_sizes)
    # Index components over axes sliced whole are 0 after clamping: drop them.
    idx_axes = [
        (j, a) for j, a in enumerate(dn.start_index_map) if not _same_dim(slice_sizes[a], oshape[a])
    ]
    nb = len(dn.operand_batching_dims)
    taken = [a for _, a in idx_axes]
    if (
        tuple(dn.operand_batching_dims) != tuple(range(nb))
        or tuple(dn.start_indices_batching_dims) != tuple(range(nb))
        or taken != list(range(nb, nb + len(taken)))
        or any(int(slice_sizes[a]) != 1 for a in taken)
        or any(a not in taken for a in dn.collapsed_slice_dims)
    ):
      raise UnsupportedPrimitive(f"gather of this form ({_describe(eqn)})")
    ishape = eqn.invars[1].aval.shape
    out_rank = len(eqn.outvars[0].aval.shape)
    n_idx_batch = len(ishape) - 1
    if tuple(dn.offset_dims) != tuple(range(n_idx_batch, out_rank)):
      raise UnsupportedPrimitive(f"gather with offset dims inside ({_describe(eqn)})")
    idx = self.name(indices, eqn.invars[1].aval)
    cols = [j for j, _ in idx_axes]
    if cols != list(range(ishape[-1])):
      idx = self.g.node("Gather", [idx, self.g.ints(cols)], axis=len(ishape) - 1)
    idx = self.g.node("Cast", [idx], to=TensorProto.INT64)
    hi = self.g.ints([int(oshape[a]) - 1 for a in taken])
    valid = None
    if mode_name == "FILL_OR_DROP":  # out of bounds: the fill value (JAX's default: NaN / min)
      ok = self.g.node(
          "And",
          [
              self.g.node("GreaterOrEqual", [idx, self.g.ints([0])]),
              self.g.node("LessOrEqual", [idx, hi]),
          ],
      )
      ok = self.g.node("Cast", [ok], to=TensorProto.INT32)
      valid = self.g.node("ReduceMin", [ok, self.g.ints([-1])], keepdims=0)
    if mode_name in ("CLIP", "FILL_OR_DROP"):
      idx = self.g.node("Max", [self.g.node("Min", [idx, hi]), self.g.ints([0])])
    out = self.g.node("GatherND", [self.name(operand, eqn.invars[0].aval), idx], batch_dims=nb)
    kept = [a for a in taken if a not in dn.collapsed_slice_dims]
    if kept:  # sliced to size 1 but not collapsed: a unit axis in the output
      first = n_idx_batch
      out = self.g.node("Unsqueeze", [out, self.g.ints([first + i for i in range(len(kept))])])
    if valid is not None:
      trailing = list(range(n_idx_batch, out_rank))
      valid = self.g.node("Cast", [valid], to=TensorProto.BOOL)
      if trailing:
        valid = self.g.node("Unsqueeze", [valid, self.g.ints(trailing)])
      dtype = _np_dtype(eqn.outvars[0].aval)
      fill = _fill(dtype) if fill_value is None else fill_value
      out = self.g.node("Where", [valid, out, self.g.const(np.asarray(fill, dtype))])
    return out

  def _take(self, eqn, operand, indices, dn, slice_sizes, mode_name):
    """A gather of whole slices along one axis (`jnp.take`, e.g. channels chosen by a constant
    table): ONNX Gather on that axis, or None for another form."""
    oshape = eqn.invars[0].aval.shape
    ishape = eqn.invars[1].aval.shape
    if len(dn.start_index_map) != 1 or dn.operand_batching_dims:
      return None
    (a,) = dn.start_index_map
    whole = all(_same_dim(slice_sizes[i], oshape[i]) for i in range(len(oshape)) if i != a)
    if tuple(dn.collapsed_slice_dims) != (a,) or int(slice_sizes[a]) != 1 or not whole:
      return None
    n_idx_batch = len(ishape) - 1
    out_rank = len(eqn.outvars[0].aval.shape)
    if tuple(dn.offset_dims) != tuple(range(a)) + tuple(range(a + n_idx_batch, out_rank)):
      return None
    size = int(oshape[a])
    if isinstance(indices, np.ndarray):
      idx = indices[..., 0].astype(np.int64)
      if mode_name == "FILL_OR_DROP" and ((idx < 0) | (idx >= size)).any():
        return None
      idx = self.g.const(np.clip(idx, 0, size - 1))
    else:
      if mode_name == "FILL_OR_DROP":
        return None
      idx = self.name(indices, eqn.invars[1].aval)
      idx = self.g.node("Squeeze", [idx, self.g.ints([n_idx_batch])])
      idx = self.g.node("Cast", [idx], to=TensorProto.INT64)
      hi = self.g.ints([size - 1])
      idx = self.g.node("Max", [self.g.node("Min", [idx, hi]), self.g.ints([0])])
    return self.g.node("Gather", [self.name(operand, eqn.invars[0].aval), idx], axis=a)

  def _static_gather(self, eqn, operand, indices, dn, slice_sizes):
    """A gather at constant indices that selects one window: a slice."""
    oshape = eqn.invars[0].aval.shape
    if indices.ndim != 1 or tuple(dn.offset_dims) != tuple(range(len(eqn.outvars[0].aval.shape))):
      raise UnsupportedPrimitive(f"gather at several constant indices ({_describe(eqn)})")
    start = [0] * len(oshape)
    for j, a in enumerate(dn.start_index_map):
      start[a] = int(np.clip(int(indices[j]), 0, int(oshape[a]) - int(slice_sizes[a])))
    lo, hi = [], []
    for a, (s, size, d) in enumerate(zip(start, slice_sizes, oshape)):
      if _same_dim(size, d):
        lo.append(0)
        hi.append(d)
      else:
        lo.append(s)
        hi.append(s + int(size))
    out = self._slice(eqn, [operand], lo, hi, None)
    if dn.collapsed_slice_dims:
      out = self.g.node("Squeeze", [out, self.g.ints(dn.collapsed_slice_dims)])
    return out


def _fill(dtype: np.dtype):
  """JAX's fill value of an out-of-bounds gather: NaN, the minimum integer, or True."""
  if dtype.kind == "f":
    return np.nan
  if dtype.kind in "iu":
    return np.iinfo(dtype).min
  return True


def _same_dim(a, b) -> bool:
  if core.is_constant_dim(a) and core.is_constant_dim(b):
    return int(a) == int(b)
  return not core.is_constant_dim(a) and not core.is_constant_dim(b) and str(a) == str(b)


def _describe(eqn) -> str:
  shapes = ", ".join(str(getattr(v.aval, "str_short", lambda: v.aval)()) for v in eqn.invars)
  return f"{eqn.primitive.name}({shapes})"


def _value_info(name: str, aval, batch_name: str) -> onnx.ValueInfoProto:
  dims = [d if core.is_constant_dim(d) else str(d) for d in aval.shape]
  dims = [batch_name if isinstance(d, str) and d == batch_name else d for d in dims]
  return helper.make_tensor_value_info(name, _ONNX_TYPES[_np_dtype(aval)], dims)


def to_onnx(
    fn: Callable,
    constants: Any,
    inputs: dict[str, jax.ShapeDtypeStruct],
    batch_name: str = "b",
    graph_name: str = "graph",
    doc: str = "",
) -> onnx.ModelProto:
  """`fn(constants, **inputs) -> dict of arrays` as an ONNX model.

  constants: a pytree of arrays (the weights) that become initializers. inputs: name ->
  ShapeDtypeStruct in order, their shapes may hold the symbolic dimension `batch_name`
  (`jax.export.symbolic_shape`), which must be dimension 0 of the first input. The outputs
  are the returned dict's entries, named by their keys.
  """
  leaves, treedef = jax.tree.flatten(constants)
  leaves = [np.asarray(x) for x in leaves]
  names = list(inputs)

  def flat(weights, *args):
    out = fn(jax.tree.unflatten(treedef, weights), **dict(zip(names, args)))
    if not isinstance(out, dict):
      raise TypeError("fn must return a dict of arrays")
    return out

  closed = jax.make_jaxpr(flat)(
      [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves], *inputs.values()
  )
  out_tree = jax.tree.structure(jax.eval_shape(flat, leaves, *inputs.values()))
  out_names = [str(jax.tree_util.keystr(p)).strip("[]'\"") for p in _paths(out_tree)]
  graph = _Graph(names[0], batch_name)
  conv = _Converter(graph)
  args = leaves + names
  outs = conv.run(closed.jaxpr, closed.consts, args)
  nodes_out = []
  for name, value, var in zip(out_names, outs, closed.jaxpr.outvars):
    src = conv.name(value, var.aval)
    graph.nodes.append(helper.make_node("Identity", [src], [name]))
    nodes_out.append(_value_info(name, var.aval, batch_name))
  onnx_inputs = [
      _value_info(n, core.ShapedArray(s.shape, s.dtype), batch_name) for n, s in inputs.items()
  ]
  g = helper.make_graph(
      graph.nodes,
      graph_name,
      onnx_inputs,
      nodes_out,
      initializer=graph.initializers,
      doc_string=doc,
  )
  model = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
  model.ir_version = 8  # opset 18; readable by onnxruntime >= 1.14 and OpenVINO >= 2023
  return model


def _paths(treedef):
  dummy = jax.tree.unflatten(treedef, list(range(treedef.num_leaves)))
  return [p for p, _ in jax.tree_util.tree_flatten_with_path(dummy)[0]]
