"""The installed commands: console scripts, and imports only of the package's own modules."""

import ast
import os
import subprocess
import sys
import tomllib

import pytest

from cras_jax import console

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_one_console_script_runs_every_command_module():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)
  assert project["project"]["scripts"] == {"cras-jax": "cras_jax.console:main"}
  assert project["tool"]["setuptools"]["packages"]["find"]["include"] == ["cras_jax*"]
  for name, doc in console.COMMANDS.items():
    module = console.module(name)
    assert doc and "\n" not in doc, name
    with open(os.path.join(ROOT, "cras_jax", module + ".py")) as f:
      assert 'if __name__ == "__main__":' in f.read(), module
  # every command module at the root is listed; the root holds nothing else but the package's
  # face and the dispatcher
  roots = {f[:-3] for f in os.listdir(os.path.join(ROOT, "cras_jax")) if f.endswith(".py")} - {
      "__init__",
      "console",
  }
  assert roots == {console.module(name) for name in console.COMMANDS}


def test_root_entry_points_are_thin():
  """A root module defines the command's flags and calls one function: no classes, at most
  `define_flags`, `main` and one helper of its own."""
  for module in map(console.module, console.COMMANDS):
    with open(os.path.join(ROOT, "cras_jax", module + ".py")) as f:
      tree = ast.parse(f.read())
    defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert not [n for n in defs if isinstance(n, ast.ClassDef)], module
    assert len(defs) <= 3, (module, [n.name for n in defs])


def test_cras_jax_help_lists_every_command_and_a_command_runs_with_its_flags(capsys):
  with pytest.raises(SystemExit) as e:
    console.main(["--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  for name in console.COMMANDS:
    assert f"  {name} " in out, name
  out = subprocess.run(
      [sys.executable, "-c", "from cras_jax import console; console.main()", "synthetic", "--help"],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert "  --n_train:" in out.stdout


@pytest.mark.parametrize("argv", [[], ["--config=demo"], ["trian"]])
def test_no_or_an_unknown_command_says_so_and_exits_2(argv, capsys):
  with pytest.raises(SystemExit) as e:
    console.main(argv)
  assert e.value.code == 2
  captured = capsys.readouterr()
  assert "commands:" in captured.out + captured.err
  if argv:
    assert f"unknown command {argv[0]!r}" in captured.err


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
