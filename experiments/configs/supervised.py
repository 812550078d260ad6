"""Supervised-only baseline (labeled images only).

    python -m experiments.train --config=experiments/configs/supervised.py:split=1/16 \
        --workdir=runs/supervised_1_16
    # the baselines the papers report, on VOC / Cityscapes (needs ImageNet weights):
    python -m experiments.train \
        --config=experiments/configs/supervised.py:dataset=voc,split=732,root=/data/VOC2012 \
        --config.model.pretrained=/weights/resnet101.pth --workdir=runs/sup_voc_732
Arguments: `recipe=u2pl` (default; U2PL's SupOnly, the numbers DGCL's tables quote) or
`recipe=dssn` (DSSN's README: its config with the batch doubled, over the labeled list).
Expected teacher mIoU: see the README results tables.
"""

import dataclasses

from experiments.configs import base, common, dssn, recipes


def _dssn_supervised(r: recipes.Recipe) -> recipes.Recipe:
  """DSSN README: its config with "batch_size doubled ... (no need to change lr)", run by
  UniMatch's supervised.py, whose epochs go over the labeled list."""
  return dataclasses.replace(r, per_gpu_batch=2 * r.per_gpu_batch, semi=False,
                             source=f"{r.source} (batch_size doubled, README 'Supervised')")


RECIPES = {"u2pl": (recipes.U2PL_SUPONLY_VOC, recipes.U2PL_SUPONLY_CITYSCAPES),
           "dssn": (_dssn_supervised(dssn.DSSN_VOC), _dssn_supervised(dssn.DSSN_CITYSCAPES))}


def get_config(arg: str = ""):
  args = common.parse_arg(arg, recipe="")
  c = common.method(base.get_config(), "supervised", args)
  if args.dataset == "embedded" and args.recipe:
    raise ValueError("recipe= applies to dataset=voc|cityscapes")
  if args.recipe not in ("",) + tuple(RECIPES):
    raise ValueError(f"recipe={args.recipe!r}; valid: {', '.join(RECIPES)}")
  voc, cityscapes = RECIPES[args.recipe or "u2pl"]
  return common.apply_common(c, args, voc=voc, cityscapes=cityscapes)
