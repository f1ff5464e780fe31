"""The console scripts of `pip install .` (pyproject.toml [project.scripts]).

Each runs one command module exactly as `python -m cras_jax.<command>` does (its flags, its
exit status): `cras-jax` is cras_jax.main, `cras-jax-<name>` is cras_jax.<name>.
"""

from __future__ import annotations

import runpy

# script name -> the command module under cras_jax
COMMANDS = {
    "cras-jax": "main",
    "cras-jax-predict": "predict",
    "cras-jax-export": "export",
    "cras-jax-run-exported": "run_exported",
    "cras-jax-benchmark": "benchmark",
    "cras-jax-sweep": "sweep",
    "cras-jax-report": "report",
    "cras-jax-robustness": "robustness",
    "cras-jax-figures": "figures",
    "cras-jax-convert-torchvision": "convert_torchvision",
    "cras-jax-convert-visa": "convert_visa",
    "cras-jax-synthetic": "data.synthetic",
    "cras-jax-scaling": "scaling",
    "cras-jax-accelerator-check": "accelerator_check",
    "cras-jax-population-bench": "population_bench",
    "cras-jax-run-onnx": "run_onnx",
    "cras-jax-deploy-bench": "deploy_bench",
}


def _run(module: str) -> None:
  runpy.run_module(f"cras_jax.{module}", run_name="__main__", alter_sys=True)


def main() -> None:
  _run("main")


def predict() -> None:
  _run("predict")


def export() -> None:
  _run("export")


def run_exported() -> None:
  _run("run_exported")


def benchmark() -> None:
  _run("benchmark")


def sweep() -> None:
  _run("sweep")


def report() -> None:
  _run("report")


def robustness() -> None:
  _run("robustness")


def figures() -> None:
  _run("figures")


def convert_torchvision() -> None:
  _run("convert_torchvision")


def convert_visa() -> None:
  _run("convert_visa")


def synthetic() -> None:
  _run("data.synthetic")


def scaling() -> None:
  _run("scaling")


def accelerator_check() -> None:
  _run("accelerator_check")


def population_bench() -> None:
  _run("population_bench")


def run_onnx() -> None:
  _run("run_onnx")


def deploy_bench() -> None:
  _run("deploy_bench")
