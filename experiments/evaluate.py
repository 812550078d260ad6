"""Evaluates a run's checkpoint (teacher and student) with any protocol.

    python -m experiments.evaluate --workdir=runs/mt_1_16 [--step=best] \
        [--mode=sliding_window --window=801 --stride=534]
"""

from absl import app, flags

from experiments import cli

flags.DEFINE_string("workdir", None, "Run directory (holds config.json and checkpoints/).")
flags.DEFINE_string("step", "best", "'best', 'latest' or a step number.")
flags.DEFINE_string("mode", None, "whole | center_crop | sliding_window (default: the run's).")
flags.DEFINE_integer("window", None, "Sliding-window side.")
flags.DEFINE_integer("stride", None, "Sliding-window stride (default ceil(2/3 window)).")
flags.DEFINE_integer("crop", None, "Centre-crop side.")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  cli.setup()
  from semijax.train import evaluation  # pylint: disable=g-import-not-at-top
  overrides = {k: getattr(FLAGS, k) for k in ("mode", "window", "stride", "crop")
               if getattr(FLAGS, k) is not None}
  evaluation.evaluate_workdir(FLAGS.workdir, step=FLAGS.step, **overrides)


if __name__ == "__main__":
  app.run(main)
