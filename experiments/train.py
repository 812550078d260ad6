"""Trains one run; rerunning with the same --workdir resumes from its last checkpoint.

    python -m experiments.train --config=experiments/configs/mean_teacher.py:split=1/16 \
        --workdir=runs/mt_1_16 [--config.train.total_steps=3000] [--check]

--check validates the config (against every field of experiments/configs/base.py), the data
(every record decoded), the model, the workdir and an existing checkpoint, then exits without
writing anything. A refused run (bad config, data, workdir or checkpoint) prints one line
naming the culprit and exits with status 1, leaving the workdir as it was. SIGTERM/SIGINT
save a checkpoint at the next step boundary and exit with status 0.

Several processes (hosts): run the same command on each, with --distributed on a Cloud TPU
slice or under SLURM/Open MPI (detected), else --coordinator_address=HOST:PORT
--num_processes=N --process_id=I (README, "Multi-device and multi-host").
"""

import sys
import traceback

from absl import app, flags
from ml_collections import config_flags

from experiments import cli

flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.DEFINE_bool("check", False, "Validate config, data and workdir, then exit.")
config_flags.DEFINE_config_file("config", None, "Config file (path.py:args).",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def parse_flags(argv):
  """absl's flag parsing, with a one-line error for a --config override of an unknown field."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:  # ml_collections: the field does not exist
    reason = str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'")
    print(f"[semijax] error (ConfigError): a --config override names an unknown config field: "
          f"{reason}", file=sys.stderr, flush=True)
    sys.exit(1)
  except flags.IllegalFlagValueError as e:  # the config file's get_config(arg) refused its argument
    cause = e.__cause__ or e.__context__ or e
    print(f"[semijax] error (ConfigError): --config: {cause}", file=sys.stderr, flush=True)
    sys.exit(1)


def main(argv):
  del argv
  cli.setup()
  from experiments.configs import base  # pylint: disable=g-import-not-at-top
  from semijax.train import loop  # pylint: disable=g-import-not-at-top
  try:
    loop.check_config(FLAGS.config, reference=base.get_config())
    if FLAGS.check:
      loop.check(FLAGS.config, FLAGS.workdir)
    else:
      loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except loop.USER_ERRORS as e:
    if FLAGS.verbosity > 0:
      traceback.print_exc()
    print(f"[semijax] error ({type(e).__name__}): {e}", file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
