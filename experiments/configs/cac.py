"""CAC (directional context-aware consistency), one network, no EMA teacher.

    # embedded data, from the shipped pretrained backbone (the embedded benchmark's regime)
    python -m experiments.train --config=experiments/configs/cac.py:split=1/16 \\
        --workdir=runs/cac_1_16
    # no context change (both crops identical, IoU in [1, 1]: the paper's Fig. 7 / Table 3 VI):
    python -m experiments.train --config=experiments/configs/cac.py:split=1/16,preset=no_context ...
    # the paper's values where they differ from the official code (BUILD_NOTES, CAC):
    python -m experiments.train --config=experiments/configs/cac.py:split=1/16,preset=paper ...
    # the official recipe (torchvision ResNet-101/50 weights):
    python -m experiments.train \\
        --config=experiments/configs/cac.py:dataset=voc,split=1/8,root=/data/VOC2012 \\
        --config.model.pretrained=/weights/resnet101.pth --workdir=runs/cac_voc_1_8
Expected mIoU: see the README results tables (paper, DeepLabv3+ R101: VOC 1/16 72.4, 1/8 74.6,
1/4 76.3, full 78.2; R50 Cityscapes 1/8 69.7, 1/4 72.7, full 77.5).

CAC's own VOC lists (`voc_splits{0,1,2}`: 662 / 1323 / 2645 of the 10,582 augmented images) are not
shipped with semijax; `dataset=voc` runs on the nearest shipped lists, the CPS blended lists of the
same sizes (2646 for 1/4). Its Cityscapes 1/8 list (372) equals U2PL's, which is not shipped
either: the CPS lists are used. The "full" setting (every image labeled and also unlabeled) needs a
`full` split in `semijax.data` that does not exist yet (see BUILD_NOTES, CAC).
"""

from experiments.configs import base, common, recipes

# CAC's DeepLabv3+ (`models/modeling`, jfzhang95's): torchvision stem, multi-grid (1, 2, 4) OS16,
# 1x1 ASPP fusion with Dropout(0.5), a 48-channel low-level projection, bias-free decoder convs
# with Dropout(0.5) after the first, element-wise dropout, and Dropout(0.1) before the classifier.
_MODEL = dict(stem="torchvision", aspp_project_kernel=1, aspp_dropout=0.5,
              decoder_dropout=(0.5, 0.0), classifier_dropout=0.1, decoder_bias=False,
              dropout_2d=False, low_level_channels=48)
CAC_VOC = recipes.Recipe(
    source="dvlab-research/Context-Aware-Consistency configs/voc_cac_deeplabv3+_resnet101_1over8_datalist0.json",
    gpus=2, per_gpu_batch=4, epochs=80, base_lr=0.001, head_lr_mult=10.0, crop_size=320,
    output_stride=16, multi_grid=(1, 2, 4), eval_mode="whole")
CAC_CITYSCAPES = recipes.Recipe(
    source="dvlab-research/Context-Aware-Consistency configs/city_cac_deeplabv3+_resnet50_1over8_datalist0.json",
    gpus=4, per_gpu_batch=2, epochs=80, base_lr=0.01, head_lr_mult=10.0, crop_size=720,
    output_stride=16, multi_grid=(1, 2, 4), eval_mode="whole", model="deeplabv3plus_resnet50")
ITER_PER_EPOCH = 1157     # `train.py`: fixed for both datasets
BASE_SIZE = {"voc": 400, "cityscapes": 2048}
# Official `step_save` (previous steps kept as negatives) per dataset and depth.
STEP_SAVE = {("voc", "deeplabv3plus_resnet101"): 2, ("voc", "deeplabv3plus_resnet50"): 1,
             ("cityscapes", "deeplabv3plus_resnet50"): 0, ("cityscapes", "deeplabv3plus_resnet101"): 0}
PRESETS = ("official", "paper", "no_context")


def negatives_per_step(c) -> int:
  """Pixels of both crops of the global unlabeled batch at stride `cac.stride`."""
  side = c.data.crop_size // c.cac.stride
  return 2 * c.data.unlabeled_batch * side * side


def official(c):
  """`train.py` and the shipped JSON configs: 1157 iterations per epoch, 5 supervised epochs,
  base_size, the unlabeled resize range, the torchvision-stem decoder and step_save."""
  c.recipe.steps_per_epoch = ITER_PER_EPOCH
  c.train.total_steps = c.recipe.epochs * ITER_PER_EPOCH
  c.train.eval_every = c.train.checkpoint_every = ITER_PER_EPOCH
  c.train.supervised_warmup_steps = 5 * ITER_PER_EPOCH     # epoch_start_unsup
  c.data.base_size = BASE_SIZE[c.data.dataset]
  c.model.kwargs.update(_MODEL)
  # Evaluation: whole image at its size (the official pads to a multiple of 8 by reflection).
  c.data.eval_batch = 8
  c.cac.memory_steps = STEP_SAVE[(c.data.dataset, c.model.name)]


def get_config(arg: str = ""):
  args = common.parse_arg(arg, preset="official")
  c = common.method(base.get_config(), "cac", args)
  # One network: the trainer's EMA teacher copies it every step (evaluation = the network).
  c.ema.decay = 0.0
  c.ema.warmup = "none"
  if args.dataset == "embedded":
    # Sized to the embedded data: 32-pixel crops of the small DeepLabv3+ (stride-4 decoder);
    # without the 2x2 pool the crops keep 8 x 8 feature pixels (4 x 4 with it).
    c.cac.downsample = False
    c.cac.stride = 4
    c.cac.projection_dim = 32
    c.cac.unlabeled_scale_range = (1.0, 1.5)   # room for two different 32-pixel crops
    # As the official VOC R101 recipe: the negatives of the 2 previous steps.
    c.cac.memory_steps = 2
  if args.preset == "paper":
    c.cac.reduction = "per_image"     # eqs. 1, 8: 1/N_b per image, then 1/B
  elif args.preset == "no_context":
    c.cac.iou_range = (1.0, 1.0)
  elif args.preset != "official":
    raise ValueError(f"preset={args.preset!r}; expected one of {PRESETS}")
  if args.dataset == "voc" and args.split in ("full", "10582"):
    raise ValueError("split=full needs a split with every VOC image labeled (CAC's full setting "
                     "feeds the labeled images to the unlabeled branch), which semijax.data does "
                     "not have yet; see BUILD_NOTES, CAC")
  if args.dataset == "cityscapes" and args.split in ("full", "2975"):
    raise ValueError("split=full needs a split with every Cityscapes image labeled, which "
                     "semijax.data does not have yet; see BUILD_NOTES, CAC")
  return common.apply_common(c, args, voc=CAC_VOC, cityscapes=CAC_CITYSCAPES, official=official)
