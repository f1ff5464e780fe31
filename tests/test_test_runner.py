"""The test runner's settings (pyproject.toml's [tool.pytest.ini_options] and the plugin
tests/xdist_default.py): two pytest-xdist workers, one file per worker, unless the command
line says otherwise; `-n 0` and `-p no:xdist` run in one process."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

TINY_TEST = """
import json, os

def test_where_it_ran(request):
  workerinput = getattr(request.config, "workerinput", {})  # an xdist worker's
  with open(os.environ["WHERE_IT_RAN"], "w") as f:
    json.dump({
        "worker": os.environ.get("PYTEST_XDIST_WORKER"),
        "workers": workerinput.get("workercount"),
    }, f)
"""


@pytest.mark.parametrize(
    "extra, workers",
    [([], 2), (["-p", "no:xdist"], 0), (["-n", "0"], 0)],
    ids=["default", "no-xdist", "n0"],
)
@pytest.mark.slow
def test_two_workers_by_default_one_process_when_asked(tmp_path, extra, workers):
  (tmp_path / "test_tiny.py").write_text(TINY_TEST)
  where = tmp_path / "where.json"
  env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "WHERE_"))}
  got = subprocess.run(
      [sys.executable, "-m", "pytest", "-c", os.path.join(ROOT, "pyproject.toml"),
       "-p", "no:cacheprovider", "-v", *extra, "test_tiny.py"],
      cwd=tmp_path, env=dict(env, WHERE_IT_RAN=str(where)), capture_output=True, text=True,
      timeout=300,
  )  # fmt: skip
  text = got.stdout + got.stderr
  assert got.returncode == 0, text[-3000:]
  ran = json.loads(where.read_text())
  if workers:
    assert f"created: {workers}/{workers} workers" in text, text[-3000:]
    assert ran["worker"] in {f"gw{i}" for i in range(workers)}
    assert ran["workers"] == workers
    assert "scheduling tests via LoadFileScheduling" in text  # one file per worker
  else:
    assert ran == {"worker": None, "workers": None} and "workers" not in text
