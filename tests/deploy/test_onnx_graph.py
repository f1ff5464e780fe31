"""The jaxpr-to-ONNX converter, primitive by primitive: each small function's ONNX graph, run by
onnxruntime at two batch sizes (the batch dimension symbolic), equals the function run by JAX."""

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from jax import export as jax_export

from cras_jax.deploy import onnx_graph

RNG = np.random.default_rng(0)
W = {
    "conv": RNG.normal(size=(3, 3, 4, 6)).astype(np.float32),
    "depthwise": RNG.normal(size=(3, 3, 1, 4)).astype(np.float32),
    "dense": RNG.normal(size=(4, 5)).astype(np.float32),
    "centres": RNG.normal(size=(3, 64, 4)).astype(np.float32),
    "table": RNG.normal(size=(3,)).astype(np.float32),
}
NHWC = ("NHWC", "HWIO", "NHWC")


def _conv(c, x):
  y = jax.lax.conv_general_dilated(x, c["conv"], (2, 1), ((1, 2), (0, 1)), dimension_numbers=NHWC)
  d = jax.lax.conv_general_dilated(
      x, c["depthwise"], (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=NHWC,
      feature_group_count=4,
  )  # fmt: skip
  return {"strided": y, "depthwise": d}


def _pools(c, x):
  mx = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "SAME")
  sm = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), "VALID")
  return {"max": mx, "sum": sm}


def _linear(c, x):
  f = x.reshape(x.shape[0], -1, 4)  # [b, 64, 4]
  h = f @ c["dense"]  # MatMul
  t = jnp.einsum("bpd,kpd->bkp", f, c["centres"])  # Einsum with free dims on both sides
  g = jnp.einsum("bpd,bqd->bpq", f, f)  # batch dimensions
  return {"matmul": jax.nn.relu(h), "einsum": t, "batched": g}


def _match(c, x):
  """Argmax over cosine similarities, gathers of the chosen centre and per-row entries."""
  f = x.reshape(x.shape[0], -1, 4)
  cos = jnp.einsum("bpd,kpd->bk", f, c["centres"]) / (
      jnp.linalg.norm(f.reshape(f.shape[0], -1), axis=1)[:, None] + 1e-6
  )
  k = jnp.argmax(cos, axis=1)
  chosen = c["centres"][k]  # [b, 64, 4]
  sliced = jax.vmap(lambda i: jax.lax.dynamic_slice(c["centres"], (i, 0, 0), (1, 64, 4)))(k)
  near = jnp.argmax(jnp.einsum("bpd,bqd->bpq", f, chosen), axis=2)  # [b, 64]
  along = jnp.take_along_axis(chosen, near[..., None], axis=1)  # [b, 64, 4]
  return {
      "k": k,
      "chosen": chosen,
      "sliced": sliced,
      "along": along,
      "entry": c["table"][k],
      "window": jax.lax.slice_in_dim(x, 1, 7, 2, axis=1)[:, :, 2:, :3],
  }


@jax.custom_vjp
def _doubled(x):
  return 2.0 * x


_doubled.defvjp(lambda x: (2.0 * x, None), lambda _, g: (2.0 * g,))


def _elementwise(c, x):
  y = jnp.clip(x, -0.5, 0.7)
  z = jnp.where(x > 0, jax.nn.sigmoid(x), jnp.exp(-jnp.abs(x)))
  p = jnp.pad(x, ((0, 0), (1, 2), (0, 0), (0, 0)), constant_values=0.25)
  s = jnp.stack([x, -x], axis=4).sum(axis=4)
  r = jax.lax.rsqrt(x * x + 1.0) + x**3 - jnp.max(x, axis=(1, 2), keepdims=True)
  return {
      "clip": y,
      "where": z,
      "pad": p,
      "stack": s,
      "r": r,
      "u8": (x > 0.1).astype(jnp.uint8),
      "custom": _doubled(jnp.tanh(x) + jax.nn.relu(x)),
      "bcast": jnp.broadcast_to(c["table"][None, :, None], (x.shape[0], 3, 5)),
  }


@pytest.mark.parametrize(
    "fn", [_conv, _pools, _linear, _match, _elementwise], ids=lambda f: f.__name__
)
def test_graph_equals_jax_at_two_batch_sizes(fn):
  (b,) = jax_export.symbolic_shape("b", constraints=("b >= 1",))
  model = onnx_graph.to_onnx(fn, W, {"x": jax.ShapeDtypeStruct((b, 8, 8, 4), jnp.float32)})
  onnx.checker.check_model(model, full_check=True)
  assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "b"
  session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
  names = [o.name for o in session.get_outputs()]
  for batch in (1, 3):
    x = RNG.normal(size=(batch, 8, 8, 4)).astype(np.float32)
    want = jax.jit(fn)(W, x)
    got = dict(zip(names, session.run(names, {"x": x})))
    assert set(got) == set(want)
    for name, value in want.items():
      value = np.asarray(value)
      assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
      np.testing.assert_allclose(got[name], value, rtol=2e-5, atol=2e-5, err_msg=name)


def test_known_inputs_are_folded_into_initializers():
  """Work on the weights alone (a normalisation of the centres) is done once, at conversion:
  the graph holds its result, not the operations."""

  def fn(c, x):
    unit = c["centres"] / jnp.linalg.norm(c["centres"], axis=-1, keepdims=True)
    return {"y": jnp.einsum("bpd,kpd->bk", x.reshape(x.shape[0], 64, 4), unit)}

  (b,) = jax_export.symbolic_shape("b")
  model = onnx_graph.to_onnx(fn, W, {"x": jax.ShapeDtypeStruct((b, 256), jnp.float32)})
  ops = {n.op_type for n in model.graph.node}
  assert "Sqrt" not in ops and "Div" not in ops and "Einsum" in ops


def test_a_primitive_without_a_mapping_is_named():
  (b,) = jax_export.symbolic_shape("b")
  with pytest.raises(onnx_graph.UnsupportedPrimitive, match="'sort'"):
    onnx_graph.to_onnx(
        lambda c, x: {"y": jnp.sort(x, axis=1)},
        {},
        {"x": jax.ShapeDtypeStruct((b, 5), jnp.float32)},
    )


def test_a_dtype_without_an_onnx_type_is_named():
  """A cast to bfloat16 (a bfloat16 model traced as it is): named, not a KeyError."""
  (b,) = jax_export.symbolic_shape("b")
  with pytest.raises(onnx_graph.UnsupportedPrimitive, match="dtype bfloat16 has no ONNX type"):
    onnx_graph.to_onnx(
        lambda c, x: {"y": (x.astype(jnp.bfloat16) * 2).astype(jnp.float32)},
        {},
        {"x": jax.ShapeDtypeStruct((b, 5), jnp.float32)},
    )
