"""The package metadata against the locks: pyproject.toml's ranges hold both of requirements.txt's
resolutions (JAX 0.10.2 on Python 3.11, JAX 0.12.0.1 on Python 3.12 and later), so installing
cras_jax into either environment changes none of its pinned packages."""

import os
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from cras_jax.deploy import run_onnx
from tests.conftest import ROOT

PYTHONS = ("3.11", "3.12")


def _requirements(path: str) -> list[Requirement]:
  """The requirement lines of a requirements file (comments and `-r` includes left out)."""
  out = []
  with open(os.path.join(ROOT, path)) as f:
    for line in f:
      line = line.split(" #")[0].strip()
      if line and not line.startswith(("#", "-")):
        out.append(Requirement(line))
  return out


def _locked(path: str, python: str) -> dict[str, str]:
  """{name: version} of the `==` pins that apply on `python` (its markers evaluated)."""
  env = {"python_version": python, "python_full_version": f"{python}.0"}
  pins = {}
  for req in _requirements(path):
    if req.marker is not None and not req.marker.evaluate(env):
      continue
    specs = list(req.specifier)
    if len(specs) == 1 and specs[0].operator == "==":
      name = canonicalize_name(req.name) + "".join(f"[{e}]" for e in sorted(req.extras))
      assert name not in pins, f"{name} pinned twice for Python {python} in {path}"
      pins[name] = specs[0].version
  return pins


def _project() -> dict:
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)["project"]


def _ranges() -> dict[str, SpecifierSet]:
  return {
      canonicalize_name(r.name): r.specifier for r in map(Requirement, _project()["dependencies"])
  }


def test_some_packages_are_locked_per_python():
  per_python = {py: _locked("requirements.txt", py) for py in PYTHONS}
  differ = {n for n in per_python["3.11"] if per_python["3.11"][n] != per_python["3.12"].get(n)}
  assert {"jax", "jaxlib", "flax"} <= differ


@pytest.mark.parametrize("python", PYTHONS)
def test_pyproject_ranges_contain_the_locked_versions(python):
  ranges = _ranges()
  for name, version in _locked("requirements.txt", python).items():
    assert name in ranges, f"{name} is in requirements.txt but not in pyproject's dependencies"
    assert ranges[name].contains(
        version
    ), f"{name}=={version} (Python {python}) not in {ranges[name]}"


@pytest.mark.parametrize("python", PYTHONS)
def test_pyproject_requires_the_python_of_each_lock(python):
  assert SpecifierSet(_project()["requires-python"]).contains(python)


def test_pyproject_names_every_runtime_requirement_and_pins_none():
  ranges = _ranges()
  runtime = {canonicalize_name(r.name) for r in _requirements("requirements.txt")}
  assert set(ranges) == runtime
  for name, spec in ranges.items():
    assert all(s.operator not in ("==", "===") for s in spec), f"{name} pinned: {spec}"
  assert "dependencies" not in _project().get("dynamic", [])


def test_accelerator_extras_take_the_installed_jax():
  extras = _project()["optional-dependencies"]
  assert set(extras) == {"cuda12", "cuda13", "tpu", "openvino"}
  for extra in ("cuda12", "cuda13", "tpu"):
    (req,) = map(Requirement, extras[extra])
    assert (req.name, req.extras, str(req.specifier)) == ("jax", {extra}, "")


def test_openvino_extra_holds_the_tested_version():
  """The optional runtime of `run_onnx`: the extra's lower bound is the version CI installs
  (requirements-openvino.txt) and `run_onnx` names in its message when it is missing."""
  (req,) = map(Requirement, _project()["optional-dependencies"]["openvino"])
  (pin,) = _requirements("requirements-openvino.txt")
  (version,) = [s.version for s in pin.specifier]
  assert req.name == pin.name == "openvino" and str(req.specifier) == f">={version}"
  assert run_onnx.PINS["openvino"] == f"openvino=={version}"
  assert run_onnx.PINS["onnxruntime"] in open(os.path.join(ROOT, "requirements.txt")).read()


@pytest.mark.parametrize("python", PYTHONS)
def test_cuda_requirements_pin_the_cpu_jax(python):
  with open(os.path.join(ROOT, "requirements-cuda12.txt")) as f:
    assert "-r requirements.txt" in [line.strip() for line in f]
  cpu = _locked("requirements.txt", python)
  assert _locked("requirements-cuda12.txt", python) == {"jax[cuda12]": cpu["jax"]}
  assert cpu["jaxlib"] == cpu["jax"]
