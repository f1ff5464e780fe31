"""base/registry.py: one table read by the configs, the backbones and the data code; reading a
config stays cheap (no JAX, no TFDS)."""

import importlib
import subprocess
import sys

import pytest

from cras_jax.base import registry
from tests.conftest import ROOT

CONFIGS = ("mvtec", "visa", "mpdd", "btad", "itdd", "mvtec_ad2", "demo", "folder")


def test_reading_configs_imports_neither_jax_nor_tfds():
  code = (
      "import runpy, sys\n"
      f"for name in {CONFIGS!r}:\n"
      "  runpy.run_path(f'configs/{name}.py')['get_config']()\n"
      "heavy = [m for m in ('jax', 'tensorflow_datasets', 'tensorflow', 'flax') if m in sys.modules]\n"
      "assert not heavy, heavy\n"
  )
  out = subprocess.run(
      [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
  )
  assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.parametrize("name", ["mvtec", "visa", "mpdd", "btad", "itdd", "mvtec_ad2"])
def test_paper_configs_take_class_lists_and_weights_from_the_registry(name):
  config = importlib.import_module(f"cras_jax.configs.{name}").get_config()
  assert tuple(config.data.classes) == registry.dataset(config.data.name).classes
  assert config.model.weights == "torchvision"
  assert registry.backbone(config.model.backbone).torchvision_file


def test_offline_configs_keep_the_package_weights():
  for name in ("demo", "folder"):
    config = importlib.import_module(f"cras_jax.configs.{name}").get_config()
    assert config.model.weights == ""
    assert registry.backbone(config.model.backbone).default_weights == "package"


def test_torchvision_files_are_torchvisions_own():
  tv = pytest.importorskip("torchvision")
  for name in registry.RESNETS:
    url = tv.models.get_model_weights(name).IMAGENET1K_V1.url
    assert url == registry.TORCHVISION_BASE_URL + registry.backbone(name).torchvision_file


def test_hash_prefix_and_aliases():
  assert registry.backbone("wide_resnet50_2").torchvision_hash_prefix == "95faca4d"
  assert registry.hash_prefix_of("no_hash.pth") == ""
  assert registry.dataset("mvtec_ad") is registry.dataset("mvtec")
  assert registry.dataset("synthetic") is None and not registry.fetchable("folder")
  assert registry.fetchable("visa") and registry.dataset("visa").archive_url.startswith("https")
  for spec in registry.DATASETS.values():  # either an address or a way to get it
    assert spec.name == "folder" or spec.archive_url or spec.how_to_get
    assert spec.archive_sha256 is None or len(spec.archive_sha256) == 64
