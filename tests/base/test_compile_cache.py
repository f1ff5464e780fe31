"""base/compile_cache.py: where the persistent compilation cache goes, and that `setup`
points JAX at it (in a child process: the test process keeps its own cache settings)."""

import os
import subprocess
import sys

import ml_collections
import pytest

from cras_jax.base import compile_cache, errors
from tests.conftest import ROOT


def _config(compilation="auto", cache_dir=""):
  return ml_collections.ConfigDict({"cache": {"compilation": compilation, "dir": cache_dir}})


def test_resolve_order_field_env_jax_env_user_cache(tmp_path):
  home = {"HOME": str(tmp_path)}
  assert compile_cache.resolve(_config(), home) == f"{tmp_path}/.cache/cras_jax/xla"
  xdg = dict(home, XDG_CACHE_HOME="/x")
  assert compile_cache.resolve(_config(), xdg) == "/x/cras_jax/xla"
  assert compile_cache.resolve(_config(cache_dir="/c"), xdg) == "/c/xla"
  assert compile_cache.resolve(None, dict(xdg, CRAS_JAX_CACHE_DIR="/u")) == "/u/xla"
  jax_env = dict(xdg, JAX_COMPILATION_CACHE_DIR="/j")
  assert compile_cache.resolve(_config(), jax_env) == "/j"
  ours = dict(jax_env, CRAS_JAX_COMPILATION_CACHE="/e")
  assert compile_cache.resolve(_config(), ours) == "/e"
  assert compile_cache.resolve(_config("/f"), ours) == "/f"  # the field wins
  assert compile_cache.resolve(_config(), dict(ours, CRAS_JAX_COMPILATION_CACHE="off")) is None
  assert compile_cache.resolve(_config("off"), ours) is None
  assert compile_cache.resolve(ml_collections.ConfigDict(), xdg) == "/x/cras_jax/xla"  # old run


def test_setup_points_jax_at_the_cache_and_off_turns_it_off(tmp_path):
  code = (
      "import jax, ml_collections\n"
      "from cras_jax.base import compile_cache\n"
      f"c = ml_collections.ConfigDict({{'cache': {{'compilation': '{tmp_path}/xla'}}}})\n"
      "assert compile_cache.setup(c) == jax.config.jax_compilation_cache_dir\n"
      "assert jax.config.jax_enable_compilation_cache\n"
      "assert jax.config.jax_persistent_cache_min_compile_time_secs == compile_cache.MIN_COMPILE_SECS\n"
      "c.cache.compilation = 'off'\n"
      "assert compile_cache.setup(c) is None and not jax.config.jax_enable_compilation_cache\n"
  )
  env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": ROOT}
  out = subprocess.run(
      [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert (tmp_path / "xla").is_dir() and not (tmp_path / ".cache").exists()


@pytest.mark.parametrize("kind", ["file", "under_a_file", "symlink_loop"])
def test_a_cache_path_that_cannot_be_a_folder_is_one_user_error(tmp_path, kind):
  """The setting is checked before JAX is pointed at it (no NotADirectoryError traceback)."""
  (tmp_path / "afile").write_text("x")
  os.symlink(tmp_path / "loop_b", tmp_path / "loop_a")
  os.symlink(tmp_path / "loop_a", tmp_path / "loop_b")
  path = {
      "file": tmp_path / "afile",
      "under_a_file": tmp_path / "afile" / "xla",
      "symlink_loop": tmp_path / "loop_a" / "xla",
  }[kind]
  with pytest.raises(errors.UserValueError, match="compilation cache folder .* cannot be made"):
    compile_cache.setup(_config(compilation=str(path)))
  assert (tmp_path / "afile").read_text() == "x"
