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

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import onnx
from jax._src import core
from onnx import helper

from cras_jax.deploy.onnx_base import (  # noqa: F401 - UnsupportedPrimitive: the API's
    ONNX_TYPES,
    Graph,
    UnsupportedPrimitive,
    describe,
    is_static,
    np_dtype,
    onnx_type,
)
from cras_jax.deploy.onnx_linalg import LinalgGatherRules
from cras_jax.deploy.onnx_rules import ElementwiseShapeRules

OPSET = 18

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


class _Converter(ElementwiseShapeRules, LinalgGatherRules):
  """Writes a jaxpr's equations into a `Graph`: calls inlined, known values folded, every
  other primitive by its rule (`onnx_rules`, `onnx_linalg`)."""

  def __init__(self, graph: Graph):
    self.g = graph

  # --------------------------------------------------------------------------- values

  def name(self, v, aval=None) -> str:
    """The ONNX tensor name of a value (a constant becomes an initializer)."""
    if isinstance(v, str):
      return v
    arr = np.asarray(v)
    if aval is not None and arr.dtype != np_dtype(aval):
      arr = arr.astype(np_dtype(aval))
    return self.g.const(arr)

  def read(self, env, var):
    if isinstance(var, core.Literal):
      return np.asarray(var.val, dtype=np_dtype(var.aval))
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
          f"no ONNX form for the JAX primitive {prim!r} ({describe(eqn)}); "
          f"see docs/deploy.md for the primitives that convert"
      )
    out = rule(eqn, ins, **eqn.params)
    return out if isinstance(out, list) else [out]

  def _foldable(self, eqn, ins) -> bool:
    if not all(isinstance(x, np.ndarray) for x in ins):
      return False
    if not all(is_static(v.aval.shape) for v in eqn.outvars):
      return False
    size_in = sum(x.size for x in ins)
    size_out = sum(int(np.prod(v.aval.shape)) for v in eqn.outvars)
    return size_out <= max(_FOLD_FREE, _FOLD_GROWTH * size_in)


def _value_info(name: str, aval, batch_name: str) -> onnx.ValueInfoProto:
  dims = [d if core.is_constant_dim(d) else str(d) for d in aval.shape]
  dims = [batch_name if isinstance(d, str) and d == batch_name else d for d in dims]
  return helper.make_tensor_value_info(name, onnx_type(np_dtype(aval)), dims)


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
  graph = Graph(names[0], batch_name)
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
