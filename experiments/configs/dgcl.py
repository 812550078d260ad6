"""DGCL (density-guided contrastive learning) on the embedded data.

    python -m experiments.train --config=experiments/configs/dgcl.py:split=1/8 \\
        --workdir=runs/dgcl_1_8
    # the paper's loss weights and sample counts instead of the official code's:
    python -m experiments.train --config=experiments/configs/dgcl.py:split=1/8,preset=paper ...
Expected teacher mIoU: see the README results table.
"""

from experiments.configs import base, common


def paper_preset(c):
  """The paper's values where they differ from the official code (BUILD_NOTES, DGCL)."""
  c.dgcl.unsup_weight = 1.0
  c.dgcl.contra_weight = 1.0
  c.dgcl.num_anchors = 256
  c.dgcl.num_batch_keys = 256
  c.dgcl.num_bank_keys = 256
  c.dgcl.loss_form = "paper"
  c.dgcl.contra_label_filter = False
  return c


def get_config(arg: str = ""):
  args = common.parse_arg(arg, preset="official")
  c = base.get_config()
  c.method.name = "dgcl"
  # Sized to the embedded data: a 48x48 crop gives 12x12 feature pixels per image.
  c.dgcl.projection_dim = 32
  c.dgcl.bank_size = 2000
  c.dgcl.push_per_class = 200
  c.dgcl.min_bank_size_for_density = 200
  c.dgcl.max_pixels_per_class = 2048
  c.dgcl.num_anchors = 64
  c.dgcl.num_batch_keys = 16
  c.dgcl.num_bank_keys = 16
  c.dgcl.num_negatives = 256
  if args.preset == "paper":
    paper_preset(c)
  elif args.preset != "official":
    raise ValueError(f"preset={args.preset!r}; expected 'official' or 'paper'")
  common.apply_common(c, args)
  if args.smoke:
    c.dgcl.bank_size = 64
    c.dgcl.push_per_class = 32
    c.dgcl.min_bank_size_for_density = 32
    c.dgcl.max_pixels_per_class = 256
  return c
