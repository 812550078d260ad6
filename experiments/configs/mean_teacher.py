"""Mean-teacher weak-to-strong baseline.

    python -m experiments.train --config=experiments/configs/mean_teacher.py:split=1/16 \
        --workdir=runs/mean_teacher_1_16
    # on VOC / Cityscapes with the U2PL codebase's recipe (recipes.U2PL_VOC / U2PL_CITYSCAPES):
    python -m experiments.train \
        --config=experiments/configs/mean_teacher.py:dataset=voc,split=1/8,root=/data/VOC2012 \
        --config.model.pretrained=/weights/resnet101.pth --workdir=runs/mt_voc_1_8
Expected teacher mIoU: see the README results tables (no paper reports this exact method).
"""

from experiments.configs import base, common


def get_config(arg: str = ""):
  args = common.parse_arg(arg)
  c = common.method(base.get_config(), "mean_teacher", args)
  return common.apply_common(c, args)
