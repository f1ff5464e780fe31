"""Shared test settings: the two tiers (tests/README.md), a persistent XLA compilation cache
for the session, so the end-to-end tests that start several processes compile each step once,
and the shared trained runs."""

import fcntl
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

# The tests are written for the CPU (simulated devices, bit-for-bit comparisons): JAX's CPU
# backend only, in this process and in every one the tests start, also where libtpu (the TPU
# compiler, requirements-tpu-compile.txt) or a GPU plugin is installed. The compile-only TPU
# tests reach libtpu through its topology API, which needs no TPU backend.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests compile far more than they run: XLA:CPU's LLVM backend at -O0 compiles about 15 %
# faster (the HLO passes, and so the programs' operations, are the same; every reference
# comparison holds at either level). Inherited by every process the tests start.
# CRAS_JAX_TEST_XLA_OPT=1 keeps XLA's default.
if not os.environ.get("CRAS_JAX_TEST_XLA_OPT") and "optimization_level" not in os.environ.get(
    "XLA_FLAGS", ""
):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
  ).strip()

import jax  # noqa: E402 - after the platform is chosen
import pytest  # noqa: E402
from absl import app, flags  # noqa: E402

# Folders of this test session, made by the first process (pytest's, before its xdist workers
# start) and inherited through the environment by the workers and every subprocess: nothing
# compiled or fetched by an earlier session is reused. A folder given in the environment is
# used as it is (and kept).
_SESSION_DIRS = []


def _session_dir(variable: str, prefix: str) -> str:
  if variable not in os.environ:
    os.environ[variable] = tempfile.mkdtemp(prefix=prefix)
    _SESSION_DIRS.append(os.environ[variable])
  return os.environ[variable]


# The persistent XLA compilation cache: each step compiles once per session, in any process.
jax.config.update(
    "jax_compilation_cache_dir", _session_dir("JAX_COMPILATION_CACHE_DIR", "cras_jax_test_xla_")
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
# Named weights and datasets, and every command's compilation cache "auto", go to a test user
# cache, never the real one (tests that fetch point cache.dir at their own tmp folder).
_session_dir("CRAS_JAX_CACHE_DIR", "cras_jax_test_user_cache_")


def pytest_unconfigure(config):
  for path in _SESSION_DIRS:
    shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------- the two tiers


def pytest_addoption(parser):
  parser.addoption(
      "--full",
      action="store_true",
      help="run the full tier: the fast tier plus the tests marked `slow` (CI runs both)",
  )


def pytest_configure(config):
  config.addinivalue_line(
      "markers",
      "slow: full tier only (a real compile of a big model, a real training of its own, "
      "or processes that must meet); `pytest --full` runs them",
  )


def pytest_collection_modifyitems(config, items):
  if config.getoption("--full"):
    return
  slow = [item for item in items if item.get_closest_marker("slow") is not None]
  if slow:
    config.hook.pytest_deselected(items=slow)
    items[:] = [item for item in items if item.get_closest_marker("slow") is None]


# ----------------------------------------------------------------------------- a trained run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Command-line overrides that shrink the demo to seconds (images, dataset and model).
TINY = [
    "--config.data.synthetic.image_size=64",
    "--config.data.synthetic.n_train=6",
    "--config.data.synthetic.n_test_good=2",
    "--config.data.synthetic.n_test_defect_per_type=1",
    "--config.data.resize=73",
    "--config.data.crop=64",
    "--config.model.pre_embed_dim=48",
    "--config.model.embed_dim=32",
    "--config.train.batch_size=8",
    "--config.eval.batch_size=8",
    "--config.train.log_every=1",
    # Heatmap PNGs take about 0.3 s each with matplotlib: only the tests that check them
    # ask for them.
    "--config.eval.num_heatmaps=0",
]


def run_module(module: str, *args, timeout: int = 600, cwd=ROOT) -> str:
  """Runs `python -m module args` (from the repository root, or from `cwd` with the
  repository on the path); asserts success, returns output."""
  env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=ROOT)
  out = subprocess.run(
      [sys.executable, "-m", module, *map(str, args)],
      cwd=cwd,
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout,
  )
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return out.stdout + out.stderr


def run_on_cpu_devices(n: int, script: str, *args, timeout: int = 600) -> str:
  """Runs `python -c script args` from the repository root with `n` simulated CPU devices;
  asserts it exits 0, returns its stdout."""
  env = dict(
      os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu"
  )
  out = subprocess.run(
      [sys.executable, "-c", script, *map(str, args)],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def parse_command_flags(command, *args) -> flags.FlagValues:
  """A command module's flags (`command.define_flags`) parsed from `args`, on a FlagValues of
  their own (absl's global flags are left alone)."""
  fv = flags.FlagValues()
  command.define_flags(fv)
  fv([command.__name__, *map(str, args)])
  return fv


def run_command(command, *args, **kwargs):
  """Runs a command module in this process as `python -m` runs it, on flags of its own.

  A command module defines `define_flags(flag_values)` and `main(argv, flag_values, ...)`
  (and may define `parse_flags(argv, flag_values) -> argv`); `kwargs` go to `main`. As under
  `errors.run`, a bad flag or a usage error exits (SystemExit, status 2). Returns what `main`
  returns."""
  fv = flags.FlagValues()
  command.define_flags(fv)
  argv = [command.__name__, *map(str, args)]
  parse = getattr(command, "parse_flags", None)
  try:
    argv = parse(argv, fv) if parse is not None else fv(argv)
    return command.main(argv, fv, **kwargs)
  except (flags.Error, app.UsageError) as e:
    print(f"{command.__name__}: {e}", file=sys.stderr)
    raise SystemExit(2) from e


def shared_once(tmp_path_factory, name: str, build) -> dict:
  """`build(base) -> dict of paths` run once for the whole test session, across pytest-xdist
  workers too: the first worker to ask builds under a folder both workers see (under a file
  lock), the others wait and reuse what it wrote. A build that failed is not reused: each
  worker that asks raises the same failure. -> the dict (paths as pathlib.Path)."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # the session's folder, shared by its workers
  base = root / f"shared_{name}"
  done = root / f"shared_{name}.json"
  with open(root / f"shared_{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      if not done.exists():
        if base.exists():
          shutil.rmtree(base)  # a build that failed on another worker: build it again here
        base.mkdir()
        paths = build(base)
        done.write_text(json.dumps({k: str(v) for k, v in paths.items()}))
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return {k: pathlib.Path(v) for k, v in json.loads(done.read_text()).items()}


def _train_tiny_run(base) -> dict:
  paths = {"workdir": base / "run", "data_root": base / "data", "cache_dir": base / "cache"}
  out = run_module(
      "cras_jax.main",
      "--config=configs/demo.py",
      f"--workdir={paths['workdir']}",
      f"--config.data.root={paths['data_root']}",
      f"--config.data.cache_dir={paths['cache_dir']}",
      *TINY,
      "--config.train.epochs=3",
      "--config.eval.num_heatmaps=1",
  )
  (base / "output.txt").write_text(out)
  return {**paths, "output": base / "output.txt"}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """A demo model trained for 3 epochs at the tiny size (one heatmap per class), shared by
  every test that scores, exports, perturbs or plots a trained run, on every worker.
  -> dict(workdir, data_root, cache_dir, output: the training's printed output). Tests read
  it or copy it; the read-only commands may add their own result files."""
  return shared_once(tmp_path_factory, "tiny_run", _train_tiny_run)
