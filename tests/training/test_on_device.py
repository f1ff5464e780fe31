"""`data.on_device`: the training loop's batches gathered on the devices are the batches read on
the host (stored features or images; one data order or one per member), so results and resume
do not depend on it; on the CPU "auto" keeps the data on the host and says so."""

import subprocess
import sys
import types

import numpy as np
import pytest

from cras_jax.base import errors
from cras_jax.engine import population, resident, sharding
from cras_jax.training import loop, on_device
from tests.conftest import ROOT, TINY
from tests.training.test_train import assert_same_final_params, metrics, run_main


def _config(setting, crop=4, batch_size=4):
  return types.SimpleNamespace(
      data=types.SimpleNamespace(on_device=setting, crop=crop),
      train=types.SimpleNamespace(batch_size=batch_size),
  )


class Reader:
  """A `loader.BatchReader` of fixed images and their class labels."""

  def __init__(self, images, labels):
    self.batch = {"image": images, "label": labels}

  def read(self, idx, keys):
    return {k: self.batch[k][np.asarray(idx)] for k in keys}


def _host_and_device(devices, seed, labels, cache=None, reader=None, setting="true"):
  n, total = len(labels), 7  # two epochs and a bit: the last batch of an epoch is short
  cfg = _config(setting)
  placed = on_device.place(cfg, devices, None, None, n, cache, reader, 0)
  host = list(loop.train_batches(0, total, seed, 4, devices, labels, cache, reader))
  dev = list(loop.train_batches(0, total, seed, 4, devices, labels, cache, reader, placed))
  return host, dev


def _assert_same(host, dev):
  assert [s for s, _ in host] == [s for s, _ in dev]
  for (_, a), (_, b) in zip(host, dev):
    assert a.keys() == b.keys()
    for k in a:
      assert a[k].dtype == b[k].dtype and a[k].sharding.is_equivalent_to(b[k].sharding, a[k].ndim)
      np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


@pytest.mark.parametrize("seed", [3, [3, 4, 5]])  # one order; one per member
def test_features_gathered_on_the_devices_are_the_host_batches(seed):
  rng = np.random.default_rng(0)
  cache = rng.normal(size=(10, 6, 5)).astype(np.float16)
  labels = rng.integers(0, 3, 10).astype(np.int32)
  devices = population.PopulationDevices(1) if isinstance(seed, list) else sharding.Devices()
  _assert_same(*_host_and_device(devices, seed, labels, cache=cache))


def test_images_gathered_on_the_devices_are_the_host_batches():
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (9, 4, 4, 3), dtype=np.uint8)
  labels = rng.integers(0, 2, 9).astype(np.int32)
  host, dev = _host_and_device(sharding.Devices(), 7, labels, reader=Reader(images, labels))
  assert "image" in dev[0][1]
  _assert_same(host, dev)


def test_auto_on_the_cpu_reads_on_the_host_and_says_so(capsys):
  cache = np.zeros((10, 6, 5), np.float16)
  placed = on_device.place(_config("auto"), sharding.Devices(), None, None, 10, cache)
  assert placed is None
  assert "data.on_device=auto: the stored features stay on the host" in capsys.readouterr().out


def test_a_run_says_where_it_reads_its_batches(tiny_run):
  out = tiny_run["output"].read_text()
  assert "data.on_device=auto: the stored features stay on the host" in out


def test_a_bad_setting_exits_2_naming_the_field(tiny_run, tmp_path):
  base = tiny_run["workdir"].parent
  out = subprocess.run(
      [
          sys.executable,
          "-m",
          "cras_jax.main",
          "--config=configs/demo.py",
          f"--workdir={tmp_path / 'w'}",
          f"--config.data.root={base / 'data'}",
          f"--config.data.cache_dir={base / 'cache'}",
          *TINY,
          "--config.data.on_device=yes",
      ],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert out.returncode == 2, out.stderr[-2000:]
  assert "data.on_device='yes'" in out.stderr and "Traceback" not in out.stderr
  assert not (tmp_path / "w").exists()


@pytest.mark.slow
@pytest.mark.parametrize("features", [True, False])
def test_the_demo_trained_on_the_devices_equals_the_host_run(tiny_run, tmp_path, features):
  """The tiny demo with data.on_device=true against the session's run (auto: the host):
  bit-identical final parameters and the same table; on images too (a run of its own)."""
  base = tiny_run["workdir"].parent
  data, cache = base / "data", base / "cache"
  extra = ["--config.train.epochs=3", "--config.eval.num_heatmaps=0"]
  if features:
    ref = tiny_run["workdir"]
  else:
    extra.append("--config.train.cache_features=False")
    ref = tmp_path / "host"
    run_main(ref, data, cache, *extra, "--config.data.on_device=false")
  work = tmp_path / "device"
  out = run_main(work, data, cache, *extra, "--config.data.on_device=true")
  assert "data.on_device=true: " in out
  assert assert_same_final_params(work, ref) == 9
  assert metrics(work)["metrics"] == metrics(ref)["metrics"]


def test_true_that_cannot_fit_is_refused_before_anything_is_put(monkeypatch):
  monkeypatch.setattr(resident, "device_limit", lambda devices: 500)  # 600 + 10 bytes needed
  monkeypatch.setattr(on_device, "step_bytes", lambda *a: 10)
  cache = np.zeros((10, 6, 5), np.float16)
  with pytest.raises(errors.UserValueError, match="data.on_device=true"):
    on_device.place(_config("true"), sharding.Devices(), None, None, 10, cache)
