"""Trains one run; rerunning with the same --workdir resumes from its last checkpoint.

    python -m experiments.train --config=experiments/configs/mean_teacher.py:split=1/16 \
        --workdir=runs/mt_1_16 [--config.train.total_steps=3000] [--check]
"""

from absl import app, flags
from ml_collections import config_flags

from experiments import cli

flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.DEFINE_bool("check", False, "Validate config, data and workdir, then exit.")
config_flags.DEFINE_config_file("config", None, "Config file (path.py:args).",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  cli.setup()
  from semijax.train import loop  # pylint: disable=g-import-not-at-top
  if FLAGS.check:
    loop.check(FLAGS.config, FLAGS.workdir)
    return
  loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
