"""Entry point: python -m cras_jax.main --config=configs/mvtec.py --workdir=runs/x"""
from absl import app, flags, logging
from ml_collections import config_flags

from cras_jax import train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, results and prepared data.")
flags.DEFINE_enum("mode", "train", ["train", "eval"],
                  "train: train (resuming from the workdir) then evaluate; "
                  "eval: score the workdir's latest checkpoint without training.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  if FLAGS.mode == "eval":
    train.evaluate_checkpoint(FLAGS.config, FLAGS.workdir)
  else:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
