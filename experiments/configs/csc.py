"""CSC (consistency and separation regularization for contrastive learning).

    python -m experiments.train --config=experiments/configs/csc.py:split=1/16 \\
        --workdir=runs/csc_1_16
    # the paper's values where the CSC candidate code (KJingfdu/CS@212c80a) differs:
    python -m experiments.train --config=experiments/configs/csc.py:split=1/16,preset=paper ...
    # VOC blended (1/16 .. 1/2) and Cityscapes (1/16, 1/8) with the paper's optimisation
    # (needs ImageNet deep-stem ResNet-101 weights):
    python -m experiments.train \\
        --config=experiments/configs/csc.py:dataset=voc,split=1/8,root=/data/VOC2012 \\
        --config.model.pretrained=/weights/resnet101.pth --workdir=runs/csc_voc_1_8
Expected teacher mIoU: see the README results tables (paper, ResNet-101: VOC blended 1/16 76.16,
1/8 78.68, 1/4 78.17, 1/2 78.44; Cityscapes 1/16 69.13, 1/8 75.64).
"""

from experiments.configs import base, common, recipes
from semijax.data import splits
from semijax.sampling import semihard

_MODEL = dict(low_level_channels=256, zero_init_residual=True)   # U2PL's decoder, OS8 multi-grid
CSC_VOC = recipes.Recipe(
    source="KJingfdu/CS@212c80a experiments/pascal/1323/ours/config.yaml (contrastive.method ccs)",
    gpus=1, per_gpu_batch=4, epochs=80, base_lr=0.00025, head_lr_mult=10.0, crop_size=469,
    output_stride=8, multi_grid=(1, 2, 4), eval_mode="center_crop", eval_window=469,
    model_kwargs=_MODEL)
CSC_CITYSCAPES = recipes.Recipe(
    source="KJingfdu/CS@212c80a experiments/cityscapes/372/ours/config.yaml",
    gpus=1, per_gpu_batch=2, epochs=200, base_lr=0.00125, head_lr_mult=1.0, crop_size=640,
    output_stride=8, multi_grid=(1, 2, 4), loss="ohem", weight_decay=5e-4,
    # U2PL's eval.py (the fork keeps it): sliding window of the 769 val crop, stride ceil(2/3).
    eval_mode="sliding_window", eval_window=769, eval_stride=513, model_kwargs=_MODEL)


def paper_preset(c, *, sizes: bool = True):
  """The paper's values where the candidate code differs (BUILD_NOTES, CSC).

  `sizes=False` keeps the bank sizes (the embedded data's are scaled to its 8x8 feature maps).
  """
  t = c.csc_contrast
  if sizes:
    t.memory_size = 2000               # S = 2000 (code: 5000 on Cityscapes)
    t.pixels_per_update = 10           # U_f = 10 (code pixel_update_freq 20)
  t.contrast_labels = "pseudo_labels"  # Algorithm 1: y_u are the masked pseudo-labels (eq. 4a)
  t.empty_bank = "pixel"               # L_p while a class bank is empty
  t.unlabeled_filter = False           # not in the paper
  t.gate_rule = "algorithm1"           # B_t+1 = B_tmp if Separ(B_tmp) < Separ(B_t)
  t.normalize_mean = True              # eq. 8a normalises the batch class mean
  t.positive_reduction = "sum"         # eqs. 5-6 sum over positives
  if c.data.dataset == "voc":
    c.data.crop_size = 480             # paper 480 (code 469)
  return c


def official(c):
  """`train_semi.py` of the candidate code: no supervised-only epoch, the teacher copies the
  student for the first epoch, EMA 0.99, per-epoch entropy drop; per-dataset contrast settings."""
  epoch = c.recipe.steps_per_epoch
  c.train.supervised_warmup_steps = 0   # sup_only_epoch 0
  c.ema.decay = 0.99
  c.ema.copy_steps = epoch              # epoch == sup_only_epoch: teacher := student every step
  c.pseudo_label.entropy_percentile.steps_per_epoch = epoch
  if "csc_contrast" in c:
    t = c.csc_contrast
    if c.data.dataset == "voc":
      t.weak_classes = semihard.VOC_WEAK_CLASSES
      t.temperature = 0.2
      t.memory_size = 2000
    else:
      t.weak_classes = semihard.CITYSCAPES_WEAK_CLASSES
      t.temperature = 0.1
      t.memory_size = 5000


def get_config(arg: str = ""):
  args = common.parse_arg(arg, preset="code")
  if args.dataset == "voc" and not args.protocol:
    # The candidate code trains on U2PL's blended lists; 1/2 is not shipped (CPS's instead).
    if splits.normalize_name(args.split) in splits.protocols("voc").get("blended_u2pl", ()):
      args.protocol = "blended_u2pl"
  c = common.method(base.get_config(), "csc", args)
  if args.dataset == "embedded" and "csc_contrast" in c:
    # Sized to the embedded data: a 32x32 crop gives 8x8 feature pixels per image.
    t = c.csc_contrast
    t.representation_dim = 32
    t.representation_channels = 32
    t.memory_size = 500
    t.pixels_per_update = 8
    t.num_views = 4
    t.num_views_weak = 4
    t.max_anchors = 256
    t.cons_probe_images = 8
  if args.preset not in ("code", "paper"):
    raise ValueError(f"preset={args.preset!r}; expected 'code' (the CSC candidate code) or "
                     "'paper'")
  paper = args.preset == "paper" and "csc_contrast" in c
  if paper and args.dataset not in recipes.DATASETS:
    paper_preset(c, sizes=False)

  def official_then_paper(c):
    official(c)
    if paper:
      paper_preset(c)
  # Both before `smoke`, which shrinks what they set.
  return common.apply_common(c, args, voc=CSC_VOC, cityscapes=CSC_CITYSCAPES,
                             official=official_then_paper)
