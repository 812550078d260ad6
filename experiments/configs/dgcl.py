"""DGCL (density-guided contrastive learning).

    python -m experiments.train --config=experiments/configs/dgcl.py:split=1/8 \\
        --workdir=runs/dgcl_1_8
    # the paper's loss weights and sample counts instead of the official code's:
    python -m experiments.train --config=experiments/configs/dgcl.py:split=1/8,preset=paper ...
    # the official recipe on VOC / Cityscapes (needs ImageNet deep-stem weights):
    python -m experiments.train \\
        --config=experiments/configs/dgcl.py:dataset=voc,split=732,root=/data/VOC2012 \\
        --config.model.pretrained=/weights/resnet101.pth --workdir=runs/dgcl_voc_732
Expected teacher mIoU: see the README results tables (paper: VOC 732 79.23, Cityscapes 1/8 77.29).
"""

from experiments.configs import base, common, recipes

DGCL_VOC = recipes.Recipe(
    source="Gavinwxy/DGCL experiments/pascal/732/dgcl/config.yaml",
    gpus=4, per_gpu_batch=4, epochs=80, base_lr=0.001, head_lr_mult=10.0, crop_size=513,
    output_stride=16, multi_grid=(1, 2, 4), eval_mode="center_crop", eval_window=513)
DGCL_CITYSCAPES = recipes.Recipe(
    source="Gavinwxy/DGCL experiments/cityscapes/372/dgcl/config.yaml",
    gpus=8, per_gpu_batch=2, epochs=200, base_lr=0.01, head_lr_mult=1.0, crop_size=769,
    output_stride=8, multi_grid=(1, 2, 4), loss="ohem",
    # eval.py (teacher): sliding window = the val crop 800, stride ceil(2/3 window).
    eval_mode="sliding_window", eval_window=800, eval_stride=534,
    model_kwargs=dict(zero_init_residual=True))


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


def official(c):
  """`train_semi.py` and the `trainer`/`net` sections of DGCL's config.yaml, in steps."""
  epoch = c.recipe.steps_per_epoch
  c.train.supervised_warmup_steps = (1 if c.data.dataset == "voc" else 10) * epoch  # sup_only_epoch
  c.ema.decay = 0.999
  c.ema.copy_steps = epoch          # the teacher is the student for the first semi epoch
  c.dgcl.steps_per_epoch = epoch    # drop percentages advance once per epoch


def get_config(arg: str = ""):
  args = common.parse_arg(arg, preset="official")
  c = base.get_config()
  c.method.name = "dgcl"
  if args.dataset == "embedded":
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
  common.apply_common(c, args, voc=DGCL_VOC, cityscapes=DGCL_CITYSCAPES, official=official)
  if args.smoke:
    c.dgcl.bank_size = 64
    c.dgcl.push_per_class = 32
    c.dgcl.min_bank_size_for_density = 32
    c.dgcl.max_pixels_per_class = 256
  return c
