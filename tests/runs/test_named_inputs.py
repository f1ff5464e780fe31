"""The paper's command with named inputs: offline it says what it would fetch, from where, and
how to provide the files by hand (exit 2); with the inputs served on the loopback (a tiny
MVTec-layout archive, a resnet18 .pth written by torch) it trains and evaluates end to end."""

import hashlib
import io
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, TINY
from tests.fixture_server import FixtureServer, closed_port_url, mvtec_tree, tar_bytes

# Runs cras_jax.main with the registry's resnet18 file renamed to the served one (its own hash
# prefix: a random network cannot carry torchvision's).
RUNNER = (
    "import dataclasses, runpy, sys\n"
    "from cras_jax.base import registry\n"
    "spec = registry.BACKBONES['resnet18']\n"
    "registry.BACKBONES['resnet18'] = dataclasses.replace(spec, torchvision_file=sys.argv.pop(1))\n"
    "runpy.run_module('cras_jax.main', run_name='__main__', alter_sys=True)\n"
)


def _run(args, cache, runner_file=None, timeout=600):
  env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1", CRAS_JAX_CACHE_DIR=str(cache))
  cmd = [sys.executable, "-c", RUNNER, runner_file] if runner_file else [sys.executable, "-m"]
  cmd += [] if runner_file else ["cras_jax.main"]
  return subprocess.run(
      cmd + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
  )


def test_offline_paper_command_says_what_it_would_fetch(tmp_path):
  weights_url = closed_port_url("")
  out = _run(
      [
          "--config=configs/mvtec.py",
          f"--workdir={tmp_path / 'run'}",
          f"--config.model.weights_url={weights_url}",
      ],
      tmp_path / "cache",
  )
  assert out.returncode == 2, out.stderr[-3000:]
  err = out.stderr
  assert "Traceback" not in err
  assert f"{weights_url}wide_resnet50_2-95faca4d.pth" in err
  assert str(tmp_path / "cache" / "weights" / "wide_resnet50_2-95faca4d.pth") in err
  assert "mvtec.com" in err and str(tmp_path / "cache" / "datasets" / "mvtec") in err
  assert "by hand" in err and "data.download_url" in err
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_paper_command_with_served_inputs_trains_and_evaluates(tmp_path):
  torch = pytest.importorskip("torch")
  tv = pytest.importorskip("torchvision")
  torch.manual_seed(0)
  buf = io.BytesIO()
  torch.save(tv.models.resnet18(weights=None).state_dict(), buf)
  pth = buf.getvalue()
  pth_name = f"resnet18-{hashlib.sha256(pth).hexdigest()[:8]}.pth"
  data = tar_bytes(mvtec_tree(str(tmp_path / "src"), ("bottle",)), "mvtec_anomaly_detection")
  tiny = [a for a in TINY if not a.startswith("--config.data.synthetic")]
  with FixtureServer({pth_name: pth, "mvtec.tar.gz": data}) as s:
    args = [
        "--config=configs/mvtec.py",
        f"--workdir={tmp_path / 'run'}",
        "--config.model.backbone=resnet18",
        f"--config.model.weights_url={s.base}",
        f"--config.data.download_url={s.url('mvtec.tar.gz')}",
        "--config.data.classes=('bottle',)",
        f"--config.data.cache_dir={tmp_path / 'data_cache'}",
        f"--config.cache.dir={tmp_path / 'cache'}",
        f"--config.cache.compilation={tmp_path / 'xla'}",
        "--config.train.epochs=1",
        "--config.log.progress=false",
        *tiny,
    ]
    out = _run(args, tmp_path / "env_cache", pth_name)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert [r[0] for r in s.requests] == [pth_name, "mvtec.tar.gz"]
  with open(tmp_path / "run" / "results" / "metrics_final.json") as f:
    assert "bottle" in json.dumps(json.load(f))
  assert (tmp_path / "cache" / "weights" / pth_name).read_bytes() == pth
  assert (tmp_path / "cache" / "datasets" / "mvtec" / "prepared.json").exists()
  assert os.listdir(tmp_path / "xla")  # compiled steps kept for the next start
  assert not (tmp_path / "env_cache").exists()  # the config field, not the environment
