"""Weights by name (`model.weights="torchvision"`): a resnet18 state dict written by torch,
served on the loopback under the registry's file name, fetched, verified against the hash
prefix of its name, read without torch, and giving torch's own features."""

import dataclasses
import hashlib
import io
import os

import jax
import numpy as np
import pytest

from cras_jax import backbones
from cras_jax.backbones import resnet, weights_fetch
from cras_jax.base import download, registry
from tests.fixture_server import FixtureServer, closed_port_url

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")


def _resnet18_pth():
  torch.manual_seed(0)
  model = torchvision.models.resnet18(weights=None).eval()
  with torch.no_grad():  # non-trivial BatchNorm statistics
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.uniform_(-0.1, 0.1)
        m.running_var.uniform_(0.5, 1.5)
  buf = io.BytesIO()
  torch.save(model.state_dict(), buf)
  return model, buf.getvalue()


@pytest.fixture(scope="module")
def served_resnet18():
  model, data = _resnet18_pth()
  name = f"resnet18-{hashlib.sha256(data).hexdigest()[:8]}.pth"
  with FixtureServer({name: data, registry.backbone("resnet18").torchvision_file: data}) as s:
    yield model, data, name, s


@pytest.fixture
def registry_names(monkeypatch, served_resnet18):
  """The resnet18 entry naming the served file (its own hash prefix)."""
  spec = dataclasses.replace(registry.backbone("resnet18"), torchvision_file=served_resnet18[2])
  monkeypatch.setitem(registry.BACKBONES, "resnet18", spec)


def test_resnet18_by_name_matches_torch_features(tmp_path, served_resnet18, registry_names):
  model, data, name, server = served_resnet18
  variables = backbones.load_variables(
      "resnet18", "torchvision", 64, cache_dir=str(tmp_path), weights_url=server.base
  )
  path = tmp_path / "weights" / name
  assert path.read_bytes() == data
  assert (tmp_path / "weights" / (name + ".sha256")).read_text().split()[0] == (
      hashlib.sha256(data).hexdigest()
  )
  x = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype(np.float32)
  ours = jax.jit(lambda v, x: resnet.ResNet("resnet18").apply(v, x, max_level=3))(variables, x)
  feats = {}
  hooks = [
      getattr(model, f"layer{i}").register_forward_hook(
          lambda m, i_, o, i=i: feats.__setitem__(i, o.numpy())
      )
      for i in (2, 3)
  ]
  with torch.inference_mode():
    model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
  for h in hooks:
    h.remove()
  for i in (2, 3):
    ref = feats[i].transpose(0, 2, 3, 1)
    err = np.abs(np.asarray(ours[f"level{i}"]) - ref).max() / np.abs(ref).max()
    assert err < 1e-4, (i, err)
  # fetched once: a second load reads the cache (the server is not asked again)
  n = len(server.requests)
  backbones.load_variables(
      "resnet18", "torchvision", 64, cache_dir=str(tmp_path), weights_url=server.base
  )
  assert len(server.requests) == n


def test_file_not_matching_the_hash_of_its_name_is_refused(tmp_path, served_resnet18):
  server = served_resnet18[3]  # serves the random file under torchvision's real name
  with pytest.raises(download.FetchError, match="f37072fd.*nothing kept"):
    weights_fetch.fetch("resnet18", str(tmp_path), server.base)
  assert sorted(os.listdir(tmp_path / "weights")) == ["resnet18-f37072fd.pth.lock"]


def test_offline_error_names_the_file_the_address_and_where_to_put_it(tmp_path):
  url = closed_port_url("")
  with pytest.raises(download.FetchError) as e:
    weights_fetch.fetch("wide_resnet50_2", str(tmp_path), url)
  msg = str(e.value)
  assert url + "wide_resnet50_2-95faca4d.pth" in msg
  assert str(tmp_path / "weights" / "wide_resnet50_2-95faca4d.pth") in msg


def test_default_address_is_torchvisions():
  assert weights_fetch.torchvision_url("wide_resnet50_2") == (
      "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth"
  )
  with pytest.raises(download.FetchError, match="no torchvision weights"):
    weights_fetch.fetch("efficientnet_lite0")
