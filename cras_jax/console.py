"""The one console script of `pip install .`: `cras-jax <command> [flags]`.

`cras-jax <command>` runs `python -m cras_jax.<command>` (the same flags, output and exit
status); `cras-jax train` is `python -m cras_jax.main`. `cras-jax --help` lists the commands,
`cras-jax <command> --help` a command's flags.
"""

from __future__ import annotations

import runpy
import sys

# command -> what it does in one line; the order of `--help`. The module is cras_jax.<command>,
# except train's (`MODULES`).
COMMANDS: dict[str, str] = {
    "train": "train a run (resuming from its workdir) and evaluate it; --mode=eval scores it",
    "predict": "score new images and folders with a trained run: scores, heatmaps, decisions",
    "export": "write a run's scoring function as one file (jax.export .npz or ONNX)",
    "run_exported": "score images with an exported .npz (JAX and NumPy only)",
    "run_onnx": "score images with an exported .onnx, without JAX (onnxruntime or OpenVINO)",
    "synthetic": "write the demo's synthetic dataset (MVTec layout) to a folder",
    "sweep": "run a sweep of configs (ablations, seeds, parameters) into one folder",
    "report": "tables and curves over runs, sweeps and seeds",
    "robustness": "score a trained run on perturbed test images",
    "figures": "the paper's figures from a trained run (t-SNE, heatmaps, histograms)",
    "submission": "MVTec AD 2's private test sets scored in the evaluation server's format",
    "benchmark": "images/s of the steps on this machine's devices",
    "scaling": "compiled programs and projections for GPUs and TPUs (no device needed)",
    "accelerator_check": "the prepared check of a GPU or TPU machine",
    "population_bench": "a population's step against its members run one by one",
    "deploy_bench": "images/s of the exports under JAX, onnxruntime and OpenVINO",
}
MODULES = {"train": "main"}  # the design's entry point keeps its name: python -m cras_jax.main


def module(command: str) -> str:
  """The module under cras_jax that runs `command`."""
  return MODULES.get(command, command)


def usage() -> str:
  width = max(map(len, COMMANDS))
  lines = [
      "usage: cras-jax <command> [flags]     (the same as python -m cras_jax.<command>;",
      "                                       train is python -m cras_jax.main)",
      "",
      "commands:",
  ]
  lines += [f"  {name:<{width}}  {doc}" for name, doc in COMMANDS.items()]
  lines += ["", "cras-jax <command> --help lists a command's flags."]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help", "help", "--helpshort"):
    print(usage())
    sys.exit(0 if argv else 2)
  name = argv[0].replace("-", "_")
  if name not in COMMANDS:
    hint = " (name the command first: cras-jax train --config=...)" if name.startswith("__") else ""
    print(f"cras-jax: unknown command {argv[0]!r}{hint}\n\n{usage()}", file=sys.stderr)
    sys.exit(2)
  sys.argv = [f"cras-jax {name}", *argv[1:]]
  runpy.run_module(f"cras_jax.{module(name)}", run_name="__main__", alter_sys=True)
