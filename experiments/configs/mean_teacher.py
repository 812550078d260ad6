"""Mean-teacher weak-to-strong baseline on the embedded data.

    python -m experiments.train --config=experiments/configs/mean_teacher.py:split=1/16 \
        --workdir=runs/mean_teacher_1_16
Expected teacher mIoU: see the README results table.
"""

from experiments.configs import base, common


def get_config(arg: str = ""):
  args = common.parse_arg(arg)
  c = base.get_config()
  c.method.name = "mean_teacher"
  return common.apply_common(c, args)
