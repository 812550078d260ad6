"""DSSN (dual-level siamese structure network, CPLG) on the embedded data.

    python -m experiments.train --config=experiments/configs/dssn.py:split=1/8 \\
        --workdir=runs/dssn_1_8
Expected teacher mIoU: see the README results table.
"""

from experiments.configs import base, common


def get_config(arg: str = ""):
  args = common.parse_arg(arg)
  c = base.get_config()
  c.method.name = "dssn"
  c.ema.decay = 0.996
  c.ema.warmup = "none"
  c.ema.copy_steps = 1       # official: EMA rate 0 at the very first step
  return common.apply_common(c, args)
