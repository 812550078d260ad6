"""Alonso et al. (ICCV 2021): pixel-level contrastive learning from a class-wise memory bank.

    python -m experiments.train --config=experiments/configs/alonso.py:split=1/16 \\
        --workdir=runs/alonso_1_16
    # with the embedded pretrained backbone (the embedded benchmark's regime):
    python -m experiments.train --config=experiments/configs/alonso.py:split=1/16 \\
        --config.model.pretrained=embedded --workdir=runs/alonso_1_16_pt
    # the paper's values where they differ from the official code (BUILD_NOTES, Alonso):
    python -m experiments.train --config=experiments/configs/alonso.py:split=1/16,preset=paper ...
    # the official cosine EMA schedule 0.995 -> 1 instead of the paper's constant 0.997:
    python -m experiments.train --config=experiments/configs/alonso.py:split=1/16,ema=cosine ...
    # the official recipe (DeepLabv2 ResNet-101, or model=v3plus for DeepLabv3+ ResNet-50):
    python -m experiments.train \\
        --config=experiments/configs/alonso.py:dataset=voc,split=1/8,root=/data/VOC2012 \\
        --config.model.pretrained=/weights/resnet101.pth --workdir=runs/alonso_voc_1_8
    python -m experiments.train \\
        --config=experiments/configs/alonso.py:dataset=cityscapes,split=1/30,root=/data/cityscapes \\
        --config.model.pretrained=/weights/resnet101.pth --workdir=runs/alonso_city_1_30
Expected mIoU (paper, student, mean of 3 splits): DeepLabv2 R101 COCO-pretrained VOC 1/50 67.9,
1/20 70.0, 1/8 71.6; Cityscapes 1/30 59.4, 1/8 64.4, 1/4 65.9; ImageNet-pretrained VOC 65.4, 67.8,
69.9, Cityscapes 58.0, 63.0, 64.8; DeepLabv3+ R50 (ImageNet) VOC 63.4, 69.1, 71.8.

Splits: the official code draws its own random subsets of the 10,582 / 2,975 training images
(`splits/{voc,city}/split_{0,1,2}.pkl`), not shipped here. Cityscapes 1/30, 1/8 and 1/4 use the
shipped lists of those sizes (UniMatch's 100, CPS's 372 and 744). VOC 1/8 uses CPS's blended 1/8
(1323). VOC 1/50 (212 images) and 1/20 (529) have no shipped list: the nearest shipped lists
are used, the classic 183 for 1/50 and CPS's blended 1/16 (662) for 1/20 (BUILD_NOTES, Alonso).

The embedded schedule: the official 2000-step ramp-up (of 150k steps) exists so that the
pseudo-labels and the bank have some quality before they count; the embedded runs get the same
from their 300-step supervised warm-up, so the bank fills from step 300 (the first
semi-supervised step), the sigmoid ramp of L_pseudo ends and the contrastive loss and ClassMix
start at step 400 (the official 1000-step lead of the bank over the loss, scaled to 100 steps).
"""

from experiments.configs import base, common, recipes
from semijax.banks import alonso as alonso_bank
from semijax.data import splits

# Official configs (`configs/configSSL_{pascal,city}_*_{COCO,v3}.json`): SGD, momentum 0.9,
# weight decay 5e-4, poly 0.9, 150k iterations, one GPU, one learning rate for all parameters.
_V2 = dict(model="deeplabv2_resnet101", output_stride=8, weight_decay=5e-4, head_lr_mult=1.0,
           eval_mode="whole", gpus=1, epochs=1)
RECIPES = {
    ("voc", "v2"): recipes.Recipe(
        source="Shathe/SemiSeg-Contrastive configs/configSSL_pascal_1_50_split0_COCO.json",
        per_gpu_batch=14, base_lr=2e-4, crop_size=321, **_V2),
    ("cityscapes", "v2"): recipes.Recipe(
        source="Shathe/SemiSeg-Contrastive configs/configSSL_city_1_30_split0_COCO.json",
        per_gpu_batch=5, base_lr=2e-4, crop_size=512, **_V2),
    ("voc", "v3plus"): recipes.Recipe(
        source="Shathe/SemiSeg-Contrastive configs/configSSL_pascal_1_8_split0_v3.json",
        per_gpu_batch=20, base_lr=2e-4, crop_size=321,
        **dict(_V2, model="deeplabv3plus_resnet50", output_stride=16)),
    ("cityscapes", "v3plus"): recipes.Recipe(
        source="Shathe/SemiSeg-Contrastive configs/configSSL_city_1_30_split0_v3.json",
        per_gpu_batch=7, base_lr=4e-4, crop_size=512,
        **dict(_V2, model="deeplabv3plus_resnet50", output_stride=16)),
}
# The official DeepLabv3+ (`model/deeplabv3.py`, from ClassMix): torchvision stem, OS16, 1x1 ASPP
# fusion with Dropout(0.5), 48-channel low-level projection, bias-free decoder convs without
# dropout, element-wise Dropout(0.1) before the classifier; heads read the pre-dropout features.
V3PLUS_KWARGS = dict(stem="torchvision", aspp_project_kernel=1, aspp_dropout=0.5,
                     dropout_2d=False, low_level_channels=48, decoder_bias=False,
                     decoder_dropout=0.0, classifier_dropout=0.1)
ITERATIONS = {"official": 150_000, "paper": 80_000}
# The paper's splits -> the nearest shipped list (dataset, protocol, name).
SPLITS = {("voc", "1/50"): ("classic", "183"), ("voc", "1/20"): ("blended_cps", "1_16"),
          ("voc", "1/8"): ("blended_cps", "1_8"), ("cityscapes", "1/30"): ("unimatch", "1_30"),
          ("cityscapes", "1/8"): ("cps", "1_8"), ("cityscapes", "1/4"): ("cps", "1_4")}
PRESETS = ("official", "paper")
EMAS = ("paper", "cosine")
MODELS = ("v2", "v3plus")


def paper_preset(c):
  """The paper's values where they differ from the official code (BUILD_NOTES, Alonso)."""
  c.alonso.rampup = "step"             # L_pseudo (and L_contr) exactly 0 for the first 2k steps
  c.alonso.augment = "paper"           # Table 1 strengths, ClassMix p = 0.8
  if "alonso_contrast" in c:
    c.alonso_contrast.rank_side = "projection"   # R_c = S_{c,xi}(Z'_c): the projection-side module
  if "entropy_min" in c:
    c.entropy_min.normalize = False    # eq. 7 in nats ...
    c.entropy_min.mask = "all"         # ... over all N pixels


def official(c, *, preset: str, model: str):
  """`trainSSL.py` and the config files, in steps (VOC / Cityscapes)."""
  dataset = c.data.dataset
  num_labeled = splits.LABELED_COUNTS[(dataset, c.data.protocol)][c.data.split]
  num_unlabeled = splits.TRAIN_COUNTS[dataset] - num_labeled
  b = c.data.labeled_batch
  c.data.unlabeled_batch = b // 2          # two strong views of B/2 images (augmentation anchoring)
  c.data.scale_range = (1.0, 1.0)          # the loader only crops; scale and flip are on the device
  c.data.flip = False
  if dataset == "cityscapes" and model == "v2":
    c.data.base_size = 1024                # images resized to 512 x 1024, then 512 crops
  if model == "v3plus":
    c.model.kwargs.update(V3PLUS_KWARGS)
  c.train.total_steps = ITERATIONS[preset]
  c.train.eval_every = 1000                # val_per_iter
  c.train.checkpoint_every = 10_000
  c.recipe.epochs = 0
  c.recipe.steps_per_epoch = 0
  c.alonso.exclude_background = dataset == "voc"
  c.alonso.class_balance = dataset == "cityscapes"
  c.alonso.balance_labeled_rows = max(1, num_labeled // b)
  c.alonso.balance_unlabeled_rows = max(1, num_unlabeled // c.data.unlabeled_batch)
  if "alonso_contrast" in c:
    t = c.alonso_contrast
    rule = "paper" if preset == "paper" else f"{dataset}_official"
    t.per_image = alonso_bank.per_image_count(t.bank_size, num_labeled, rule=rule,
                                              num_classes=21 if dataset == "voc" else 19)


def get_config(arg: str = ""):
  args = common.parse_arg(arg, preset="official", ema="paper", model="v2")
  if args.preset not in PRESETS:
    raise ValueError(f"preset={args.preset!r}; expected one of {PRESETS}")
  if args.ema not in EMAS:
    raise ValueError(f"ema={args.ema!r}; expected one of {EMAS}")
  if args.model not in MODELS:
    raise ValueError(f"model={args.model!r}; expected one of {MODELS}")
  c = common.method(base.get_config(), "alonso", args)
  if args.ema == "paper":
    c.ema.decay = 0.997                # eq. 2, tau = 0.997
    c.ema.warmup = "none"
  else:
    c.ema.decay = 0.995                # official: 1 - 0.005 (cos(pi t / T) + 1) / 2
    c.ema.warmup = "cosine"
  if args.dataset == "embedded":
    if args.model != "v2":
      raise ValueError("model= applies to dataset=voc|cityscapes (the embedded data uses the "
                       "small CPU DeepLabv3+)")
    # Sized to the embedded data: 32-pixel crops, 8 x 8 decoder pixels, 32-d decoder features.
    c.alonso.flip = False              # a mirrored digit is another glyph
    c.alonso.exclude_background = True # class 0 is background, as on VOC: ClassMix pastes digits
    c.alonso.rampup_steps = 400
    c.alonso.classmix_start_step = 400
    if "alonso_contrast" in c:
      t = c.alonso_contrast
      t.dim = 32
      t.hidden = 32
      t.bank_start_step = 300          # the first semi-supervised step (after the warm-up)
      t.start_step = 400
      # max(1, psi / |X_l|): 3200 x 1/16 = 200 labeled images -> 1 (also at 1/8).
      t.per_image = 1
  elif args.dataset in recipes.DATASETS:
    key = (args.dataset, args.split)
    if key in SPLITS:
      args.protocol, args.split = SPLITS[key]
    elif not args.protocol and args.split in ("1/50", "1/20"):
      raise ValueError(f"{args.dataset} has no {args.split} split")
  if args.preset == "paper":
    paper_preset(c)
  recipe = {d: RECIPES[(d, args.model)] for d in recipes.DATASETS}
  return common.apply_common(
      c, args, voc=recipe["voc"], cityscapes=recipe["cityscapes"],
      official=lambda c: official(c, preset=args.preset, model=args.model))
