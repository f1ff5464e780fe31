"""`python -m cras_jax.main --config=configs/mvtec.py --workdir=runs/x` (`cras-jax train ...`).

Trains (resuming from the workdir) and evaluates (`train.train_and_evaluate`; with
`train.population`, every member), or with `--mode=eval` scores the workdir's latest checkpoint
(`train.evaluate_checkpoint`). Any config field can be overridden: `--config.train.epochs=3`.
"""

from __future__ import annotations

import jax
from absl import app, flags, logging

from cras_jax import configs
from cras_jax.base import compile_cache, errors, flag_checks, stop
from cras_jax.engine import determinism
from cras_jax.training import train


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command's flags (defined when it runs as a command)."""
  fv = flag_values
  flags.DEFINE_string(
      "workdir", None, "Directory for checkpoints, results and prepared data.", flag_values=fv
  )
  flags.DEFINE_enum(
      "mode",
      "train",
      ["train", "eval"],
      "train: train (resuming from the workdir) then evaluate; "
      "eval: score the workdir's latest checkpoint without training.",
      flag_values=fv,
  )
  flags.DEFINE_bool(
      "allow_config_change",
      False,
      "Continue a run in --workdir although result-changing config fields differ.",
      flag_values=fv,
  )
  flags.DEFINE_string(
      "coordinator_address",
      None,
      "host:port of process 0 for multi-process runs (jax.distributed).",
      flag_values=fv,
  )
  flags.DEFINE_integer(
      "num_processes", 1, "Number of processes of a multi-process run.", flag_values=fv
  )
  flags.DEFINE_integer(
      "process_id", 0, "This process's index in a multi-process run.", flag_values=fv
  )
  configs.define_config_flag(
      "config",
      None,
      "Training config: a shipped one by name (e.g. mvtec, demo, folder) or a file with "
      "get_config() (e.g. configs/mvtec.py).",
      flag_values=fv,
  )
  flags.mark_flags_as_required(["config", "workdir"], flag_values=fv)
  flag_checks.bounded(fv, "num_processes", 1, 65536)
  flag_checks.bounded(fv, "process_id", 0, 65535)


def main(argv, flag_values: flags.FlagValues = flags.FLAGS) -> None:
  fv = flag_values
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if "verbosity" not in fv or not fv["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  # before anything starts JAX's backends: XLA reads XLA_FLAGS once
  determinism.use_xla_flag(fv.mode != "eval" and fv.config.train.deterministic)
  compile_cache.setup(fv.config)  # before anything compiles: later starts reuse the steps
  if fv.num_processes > 1:
    jax.distributed.initialize(
        coordinator_address=fv.coordinator_address,
        num_processes=fv.num_processes,
        process_id=fv.process_id,
    )
  if fv.mode == "eval":
    with stop.StopRequest("this batch"):  # SIGINT/SIGTERM: exit 130/143, nothing written
      train.evaluate_checkpoint(fv.config, fv.workdir)
  else:
    train.train_and_evaluate(fv.config, fv.workdir, fv.allow_config_change)


if __name__ == "__main__":
  define_flags()
  errors.define_verbose_flag()
  errors.run(main)
