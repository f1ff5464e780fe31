"""The converter's rules for products, convolutions, pooling and gathers (`onnx_graph`), mixed
into its converter like `onnx_rules`' (they use its `_slice`)."""

from __future__ import annotations

import string

import numpy as np
from onnx import TensorProto

from cras_jax.deploy.onnx_base import (
    UnsupportedPrimitive,
    describe,
    gather_fill,
    np_dtype,
    onnx_type,
    same_dim,
)


class LinalgGatherRules:
  """Products, convolutions, window reductions and gathers."""

  # --------------------------------------------------------------------------- linear algebra

  def _dot_general(self, eqn, ins, dimension_numbers, preferred_element_type=None, **_):
    (lc, rc), (lb, rb) = dimension_numbers
    lhs, rhs = ins
    la, ra = eqn.invars[0].aval, eqn.invars[1].aval
    nl, nr = len(la.shape), len(ra.shape)
    out_dtype = np_dtype(eqn.outvars[0].aval)
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
    if out_dtype != np_dtype(la):
      out = self.g.node("Cast", [out], to=onnx_type(out_dtype))
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
      raise UnsupportedPrimitive(f"transposed or batch-grouped convolution ({describe(eqn)})")
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
    scale = self.g.const(np.asarray(size, np_dtype(eqn.outvars[0].aval)))
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
      raise UnsupportedPrimitive(f"{eqn.primitive.name} of this form ({describe(eqn)})")
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
        raise UnsupportedPrimitive(f"dilated window sum ({describe(eqn)})")
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
        (j, a) for j, a in enumerate(dn.start_index_map) if not same_dim(slice_sizes[a], oshape[a])
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
      raise UnsupportedPrimitive(f"gather of this form ({describe(eqn)})")
    ishape = eqn.invars[1].aval.shape
    out_rank = len(eqn.outvars[0].aval.shape)
    n_idx_batch = len(ishape) - 1
    if tuple(dn.offset_dims) != tuple(range(n_idx_batch, out_rank)):
      raise UnsupportedPrimitive(f"gather with offset dims inside ({describe(eqn)})")
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
      dtype = np_dtype(eqn.outvars[0].aval)
      fill = gather_fill(dtype) if fill_value is None else fill_value
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
    whole = all(same_dim(slice_sizes[i], oshape[i]) for i in range(len(oshape)) if i != a)
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
      raise UnsupportedPrimitive(f"gather at several constant indices ({describe(eqn)})")
    start = [0] * len(oshape)
    for j, a in enumerate(dn.start_index_map):
      start[a] = int(np.clip(int(indices[j]), 0, int(oshape[a]) - int(slice_sizes[a])))
    lo, hi = [], []
    for a, (s, size, d) in enumerate(zip(start, slice_sizes, oshape)):
      if same_dim(size, d):
        lo.append(0)
        hi.append(d)
      else:
        lo.append(s)
        hi.append(s + int(size))
    out = self._slice(eqn, [operand], lo, hi, None)
    if dn.collapsed_slice_dims:
      out = self.g.node("Squeeze", [out, self.g.ints(dn.collapsed_slice_dims)])
    return out
