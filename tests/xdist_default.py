"""A pytest plugin (pyproject.toml's addopts load it: `-p tests.xdist_default`): the suite's
default of two pytest-xdist workers, one file per worker (`-n 2 --dist=loadfile`), where xdist
can give it.

The default is added to the command line only when the xdist plugin is loaded (not under
`-p no:xdist`, nor where pytest-xdist is not installed, which a plain `-n 2` in addopts would
make an unknown-argument error), not inside an xdist worker, and when no worker count was
given (`-n`/`--numprocesses`, on the command line or in PYTEST_ADDOPTS: `-n 0` runs in one
process) and neither --pdb nor --trace was (xdist cannot distribute those). `--dist` given by
the user wins over the default's (it comes later on the command line).
"""

from __future__ import annotations

import os

DEFAULT = ["-n", "2", "--dist=loadfile"]


def pytest_load_initial_conftests(early_config, parser, args):
  del parser  # the hook's signature
  if not early_config.pluginmanager.has_plugin("xdist"):
    return
  if hasattr(early_config, "workerinput") or os.environ.get("PYTEST_XDIST_WORKER"):
    return
  known = early_config.known_args_namespace  # parsed with xdist's options
  if getattr(known, "numprocesses", None) is not None:
    return
  if getattr(known, "usepdb", False) or getattr(known, "trace", False):
    return
  args[:0] = DEFAULT
