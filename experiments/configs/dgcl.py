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
  if "dgcl_contrast" in c:
    t = c.dgcl_contrast
    t.weight = 1.0
    t.num_anchors = 256
    t.num_batch_keys = 256
    t.num_bank_keys = 256
    t.loss_form = "paper"
    t.contra_label_filter = False
  return c


def official(c):
  """`train_semi.py` and the `trainer`/`net` sections of DGCL's config.yaml, in steps."""
  epoch = c.recipe.steps_per_epoch
  c.train.supervised_warmup_steps = (1 if c.data.dataset == "voc" else 10) * epoch  # sup_only_epoch
  c.ema.decay = 0.999
  c.ema.copy_steps = epoch          # the teacher is the student for the first semi epoch
  # Drop percentages advance once per epoch.
  c.pseudo_label.entropy_percentile.steps_per_epoch = epoch
  if "dgcl_contrast" in c:
    c.dgcl_contrast.steps_per_epoch = epoch
    if c.data.dataset == "cityscapes":
      # Official: class 0 gets no anchors on Cityscapes too, where it is road, not background
      # (VOC's background id carried over); it produced the published numbers, so it stays.
      c.dgcl_contrast.exclude_classes = (0,)


def get_config(arg: str = ""):
  args = common.parse_arg(arg, preset="official")
  c = common.method(base.get_config(), "dgcl", args)
  if args.dataset == "embedded" and "dgcl_contrast" in c:
    # Sized to the embedded data: a 32x32 crop gives 8x8 feature pixels per image.
    t = c.dgcl_contrast
    t.projection_dim = 32
    t.bank_size = 2000
    t.push_per_class = 200
    t.min_bank_size = 200
    t.max_per_class = 2048
    t.num_anchors = 64
    t.num_batch_keys = 16
    t.num_bank_keys = 16
    t.num_negatives = 256
  if args.preset == "paper":
    paper_preset(c)
  elif args.preset != "official":
    raise ValueError(f"preset={args.preset!r}; expected 'official' or 'paper'")
  return common.apply_common(c, args, voc=DGCL_VOC, cityscapes=DGCL_CITYSCAPES, official=official)
