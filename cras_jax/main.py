"""Entry point: python -m cras_jax.main --config=configs/mvtec.py --workdir=runs/x"""
from absl import app, flags, logging
from ml_collections import config_flags

from cras_jax import train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, results and prepared data.")
flags.DEFINE_enum("mode", "train", ["train", "eval"],
                  "train: train (resuming from the workdir) then evaluate; "
                  "eval: score the workdir's latest checkpoint without training.")
flags.DEFINE_bool("allow_config_change", False,
                  "Continue a run in --workdir although result-changing config fields differ.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0 for multi-process runs (jax.distributed).")
flags.DEFINE_integer("num_processes", 1, "Number of processes of a multi-process run.")
flags.DEFINE_integer("process_id", 0, "This process's index in a multi-process run.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  if FLAGS.num_processes > 1:
    import jax
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  if FLAGS.mode == "eval":
    train.evaluate_checkpoint(FLAGS.config, FLAGS.workdir)
  else:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir, FLAGS.allow_config_change)


if __name__ == "__main__":
  app.run(main)
