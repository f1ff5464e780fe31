"""`--help` of the commands, tried as a new user would: exit status 0, the command's own flags
listed (also those defined by a shared helper), and `asked_for_help`'s reading of a command
line."""

import os
import subprocess
import sys

import pytest

from cras_jax.base import errors
from tests.conftest import ROOT

CASES = [
    ("cras_jax.predict", ["--member", "--workdir", "--image_threshold"]),
    ("cras_jax.export", ["--member", "--workdir", "--output", "--format"]),
    ("cras_jax.deploy_bench", ["--setups", "--batch_sizes", "--runtimes"]),
    ("cras_jax.robustness", ["--member", "--workdir"]),
    ("cras_jax.figures", ["--member", "--workdir"]),
    ("cras_jax.synthetic", ["--root", "--image_size", "--n_train"]),
]


@pytest.mark.parametrize("module,listed", CASES, ids=[c[0] for c in CASES])
def test_help_exits_0_and_lists_the_commands_flags(module, listed):
  out = subprocess.run(
      [sys.executable, "-m", module, "--help"],
      cwd=ROOT,
      env=dict(os.environ, PYTHONPATH=ROOT),
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  for flag in listed:
    assert f"  {flag}:" in out.stdout, (flag, out.stdout[-3000:])


@pytest.mark.parametrize(
    "args,asked",
    [
        (["--help"], True),
        (["-?"], True),
        (["--workdir=w", "--helpfull"], True),
        (["-helpshort"], True),
        (["--workdir=help"], False),
        (["--", "--help"], False),
        (["--helpers=1"], False),
        ([], False),
    ],
)
def test_asked_for_help_reads_only_absls_help_flags(args, asked):
  assert errors.asked_for_help(args) is asked
