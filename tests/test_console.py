"""The installed commands: console scripts, and imports only of the package's own modules."""

import os
import subprocess
import sys
import tomllib

import pytest

from cras_jax import console

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_console_script_runs_a_command_module():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)
  scripts = project["project"]["scripts"]
  assert set(scripts) == set(console.COMMANDS)
  assert project["tool"]["setuptools"]["packages"]["find"]["include"] == ["cras_jax*"]
  for script, target in scripts.items():
    module, func = target.split(":")
    assert module == "cras_jax.console" and callable(getattr(console, func))
    command = console.COMMANDS[script]
    path = os.path.join(ROOT, "cras_jax", *command.split("."))
    main_file = os.path.join(path, "__main__.py") if os.path.isdir(path) else path + ".py"
    with open(main_file) as f:
      assert 'if __name__ == "__main__":' in f.read(), main_file


HOSTILE = """import os
open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "imported_{name}"), "w").close()
raise RuntimeError("the working directory's {name} package was imported")
"""


@pytest.mark.slow
def test_a_configs_or_tools_package_in_the_working_directory_is_never_imported(tmp_path):
  for name in ("configs", "tools"):
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text(HOSTILE.format(name=name))
    for module in ("demo", "mvtec", "sweep", "benchmark"):
      (tmp_path / name / f"{module}.py").write_text(HOSTILE.format(name=name))
  # A config by name, checked before any data work: fails fast on the bad field.
  out = _python(
      tmp_path, "-m", "cras_jax.main", "--config=demo", "--workdir=w", "--config.train.epochs=0"
  )
  assert out.returncode == 2, out.stderr[-3000:]
  assert "train.epochs=0: must be an integer >= 1" in out.stderr
  # Every module of the package imports without touching them.
  code = (
      "import pkgutil, importlib, sys, cras_jax\n"
      "for m in pkgutil.walk_packages(cras_jax.__path__, 'cras_jax.'):\n"
      "  if not m.name.endswith('__main__'):\n"
      "    importlib.import_module(m.name)\n"
      "assert 'configs' not in sys.modules and 'tools' not in sys.modules\n"
  )
  out = _python(tmp_path, "-c", code)
  assert out.returncode == 0, out.stderr[-3000:]
  assert not list(tmp_path.glob("imported_*"))


def _python(cwd, *args) -> subprocess.CompletedProcess:
  """Python in `cwd` (first on its path) with the repository importable after it."""
  return subprocess.run(
      [sys.executable, *args],
      cwd=cwd,
      env=dict(os.environ, PYTHONPATH=ROOT),
      capture_output=True,
      text=True,
      timeout=300,
  )
