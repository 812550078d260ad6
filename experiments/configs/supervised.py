"""Supervised-only baseline on the embedded data (labeled images only).

    python -m experiments.train --config=experiments/configs/supervised.py:split=1/16 \
        --workdir=runs/supervised_1_16
Expected teacher mIoU: see the README results table.
"""

from experiments.configs import base, common


def get_config(arg: str = ""):
  args = common.parse_arg(arg)
  c = base.get_config()
  c.method.name = "supervised"
  return common.apply_common(c, args)
