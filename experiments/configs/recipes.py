"""Official training recipes on PASCAL VOC 2012 and Cityscapes.

`voc(c, protocol, split)` and `cityscapes(c, split)` turn a method config into the recipe of an
official codebase on one of the shipped split lists (`semijax.data.splits`): data, model,
optimizer, schedule, loss, evaluation and the `recipe.*` record. A method passes its own
`Recipe` (DGCL's and DSSN's are in their config files); the default is the U2PL codebase's
semi-supervised recipe, which DGCL and the CSC candidate inherit. Method-specific schedules
(warm-up epochs, EMA, pseudo-label rules) stay in the method files.

    python -m experiments.train \\
        --config=experiments/configs/dgcl.py:dataset=voc,split=732,root=/data/VOC2012 \\
        --config.model.pretrained=/weights/resnet101.pth --workdir=runs/dgcl_voc_732

Every number below is read from the official config files and training scripts named in
`source`; BUILD_NOTES lists where they differ from the papers.
"""

import dataclasses
import math
from typing import Optional, Tuple

import ml_collections

from semijax.data import splits

DATASETS = ("voc", "cityscapes")

# Eval canvas: VOC images are at most 500 px a side, every Cityscapes image is 1024 x 2048.
_EVAL_SIZE = {"voc": (500, 500), "cityscapes": (1024, 2048)}
_EVAL_BATCH = 8   # global; divides 1, 2, 4 and 8 devices


@dataclasses.dataclass(frozen=True)
class Recipe:
  """One official codebase's settings on one dataset, in its own (per-GPU) terms.

  Attributes:
    source: the official config file (repository and path) the numbers come from.
    gpus: GPUs of the published run.
    per_gpu_batch: labeled images per GPU per step (and as many unlabeled ones when `semi`).
    epochs: training epochs.
    base_lr: backbone learning rate.
    head_lr_mult: decoder/head learning rate = base_lr * this.
    crop_size: training crop side.
    output_stride: backbone output stride (16: dilated layer4; 8: dilated layer3 and 4).
    eval_mode: 'whole', 'center_crop' or 'sliding_window'.
    eval_window: centre-crop side or sliding-window side (0 for 'whole').
    eval_stride: sliding-window stride (0 for the other modes).
    multi_grid: layer4 multi-grid multipliers, () for none.
    loss: supervised loss, 'ce' or 'ohem'.
    ohem_min_kept: OHEM minimum kept pixels per GPU (the official configs count per GPU).
    weight_decay: SGD weight decay.
    momentum: SGD momentum.
    power: poly decay power.
    semi: an epoch runs over the unlabeled list (semi-supervised codes), else over the
      labeled list (supervised-only codes).
    drop_last: the training DataLoader drops the last partial batch.
    model: `semijax.models.registry` name.
    model_kwargs: further backbone / DeepLabv3+ arguments (`model.kwargs`).
    remat: `model.remat` that fits an 80 GB device at `per_gpu_batch` (the issue-17 memory
      table, `experiments/benchmarks/memory.py`; 'none' where nothing needs recomputing).
  """
  source: str
  gpus: int
  per_gpu_batch: int
  epochs: int
  base_lr: float
  head_lr_mult: float
  crop_size: int
  output_stride: int
  eval_mode: str
  eval_window: int = 0
  eval_stride: int = 0
  multi_grid: Tuple[int, ...] = ()
  loss: str = "ce"
  ohem_min_kept: int = 100000
  weight_decay: float = 1e-4
  momentum: float = 0.9
  power: float = 0.9
  semi: bool = True
  drop_last: bool = True
  model: str = "deeplabv3plus_resnet101"
  model_kwargs: dict = dataclasses.field(default_factory=dict)
  remat: str = "none"

  @property
  def global_batch(self) -> int:
    return self.gpus * self.per_gpu_batch


def steps_per_epoch(recipe: Recipe, num_labeled: int, num_unlabeled: int) -> int:
  """Iterations per epoch as the official loaders count them.

  Semi-supervised codes (U2PL/DGCL `build_*_semi_loader`, UniMatch/DSSN `trainloader_u`) iterate
  over the unlabeled list, the labeled list being resampled to its length; supervised-only codes
  iterate over the labeled list. With N items on G GPUs, `DistributedSampler` gives each GPU
  ceil(N / G) (padding by repetition) and `DataLoader` makes batches of b per GPU:

      steps/epoch = floor(ceil(N / G) / b)   with drop_last (every semi loader, UniMatch/DSSN)
                  = ceil(ceil(N / G) / b)    without (U2PL's supervised `build_*loader`)

  e.g. DGCL VOC 732: N = 10582 - 732 = 9850, G = 4, b = 4 -> floor(2463 / 4) = 615 (x 80 epochs
  = 49,200 steps); DSSN VOC 1/16: N = 9920, G = 4, b = 2 -> 1240 (matches its training logs).
  """
  n = num_unlabeled if recipe.semi else num_labeled
  per_gpu = math.ceil(n / recipe.gpus)
  if recipe.drop_last:
    return per_gpu // recipe.per_gpu_batch
  return math.ceil(per_gpu / recipe.per_gpu_batch)


def _choices(dataset: str) -> str:
  return "; ".join(f"{p}: {', '.join(names)}" for p, names in splits.protocols(dataset).items())


def resolve(dataset: str, protocol: str, split) -> Tuple[str, str]:
  """`(protocol, split name)` of a shipped split list.

  Args:
    dataset: 'voc' or 'cityscapes'.
    protocol: a registered protocol, or '' to infer it from the split name (VOC: `classic` for
      92..1464, else `blended_cps`; Cityscapes: `cps`, or `unimatch` for 1_30).
    split: e.g. 732, '1/16', '1_16'.

  Raises:
    ValueError: for an unknown dataset, protocol or split, listing the valid choices.
  """
  if dataset not in DATASETS:
    raise ValueError(f"dataset={dataset!r} has no official recipe; valid: {', '.join(DATASETS)}")
  registered = splits.protocols(dataset)
  name = splits.normalize_name(split)
  if not protocol:
    protocol = next((p for p, names in registered.items() if name in names), "")
    if not protocol:
      raise ValueError(f"{dataset} has no split {split!r}; valid (protocol: splits): "
                       f"{_choices(dataset)}")
  if protocol not in registered:
    raise ValueError(f"{dataset} has no protocol {protocol!r}; valid (protocol: splits): "
                     f"{_choices(dataset)}")
  if name not in registered[protocol]:
    raise ValueError(f"{dataset} protocol {protocol!r} has no split {split!r}; valid: "
                     f"{', '.join(registered[protocol])} (all: {_choices(dataset)})")
  return protocol, name


def apply(c: ml_collections.ConfigDict, dataset: str, protocol: str, split,
          recipe: Recipe) -> ml_collections.ConfigDict:
  """Sets `c` to `recipe` on a shipped split of `dataset` (see `voc` and `cityscapes`)."""
  protocol, name = resolve(dataset, protocol, split)
  num_labeled = splits.LABELED_COUNTS[(dataset, protocol)][name]
  # The shipped lists partition the train set, so the unlabeled list holds the rest.
  num_unlabeled = splits.TRAIN_COUNTS[dataset] - num_labeled
  epoch = steps_per_epoch(recipe, num_labeled, num_unlabeled)

  c.data.dataset, c.data.protocol, c.data.split = dataset, protocol, name
  c.data.crop_size = recipe.crop_size
  c.data.scale_range = (0.5, 2.0)
  c.data.flip = True
  c.data.base_size = 0
  c.data.labeled_batch = recipe.global_batch
  c.data.unlabeled_batch = recipe.global_batch if recipe.semi else 0
  c.data.eval_batch = _EVAL_BATCH
  c.data.eval_size = _EVAL_SIZE[dataset]

  c.model.name = recipe.model
  c.model.dtype = "bfloat16"   # compute dtype on accelerators; params and losses stay float32
  # Fits 80 GB per device at the recipe's per-GPU batch; fewer devices than the recipe's need
  # more (the trainer warns from `semijax.models.memory` before compiling).
  c.model.remat = recipe.remat
  kwargs = dict(stem="deep", output_stride=recipe.output_stride, **recipe.model_kwargs)
  if recipe.multi_grid:
    kwargs["multi_grid"] = tuple(recipe.multi_grid)
  c.model.kwargs = ml_collections.ConfigDict(kwargs)

  c.optim.name = "sgd"
  c.optim.base_lr = recipe.base_lr
  c.optim.head_lr_mult = recipe.head_lr_mult
  c.optim.momentum = recipe.momentum
  c.optim.weight_decay = recipe.weight_decay
  c.optim.power = recipe.power
  c.optim.warmup_steps = 0

  c.train.total_steps = recipe.epochs * epoch
  c.train.supervised_warmup_steps = 0   # methods with supervised-only epochs set their own
  # The official codes validate (and keep the best checkpoint) once per epoch.
  c.train.eval_every = epoch
  c.train.checkpoint_every = epoch
  c.train.sync_bn = True

  c.loss.supervised = recipe.loss
  if recipe.loss == "ohem":
    c.loss.ohem_thresh = 0.7
    # Official OHEM keeps min_kept pixels per GPU; ours selects over the global batch.
    c.loss.ohem_min_kept = recipe.ohem_min_kept * recipe.gpus

  c.eval.mode = recipe.eval_mode
  c.eval.crop = recipe.eval_window if recipe.eval_mode == "center_crop" else 0
  c.eval.window = recipe.eval_window if recipe.eval_mode == "sliding_window" else 0
  c.eval.stride = recipe.eval_stride

  c.recipe.global_batch = recipe.global_batch
  c.recipe.gpus = recipe.gpus
  c.recipe.base_lr = recipe.base_lr
  c.recipe.source = recipe.source
  c.recipe.epochs = recipe.epochs
  c.recipe.steps_per_epoch = epoch
  return c


# U2PL (Wang et al., CVPR 2022), the codebase DGCL and the CSC candidate build on. Its VOC
# recipe also uses OHEM and an auxiliary layer3 head (weight 0.4; not implemented here).
U2PL_VOC = Recipe(
    source="Haochen-Wang409/U2PL experiments/pascal/1464/ours/config.yaml",
    gpus=4, per_gpu_batch=4, epochs=80, base_lr=0.001, head_lr_mult=10.0, crop_size=513,
    output_stride=8, multi_grid=(1, 2, 4), loss="ohem",
    eval_mode="center_crop", eval_window=513,
    model_kwargs=dict(low_level_channels=256, zero_init_residual=True))
U2PL_CITYSCAPES = Recipe(
    source="Haochen-Wang409/U2PL experiments/cityscapes/744/ours/config.yaml",
    gpus=8, per_gpu_batch=2, epochs=200, base_lr=0.01, head_lr_mult=1.0, crop_size=769,
    output_stride=8, multi_grid=(1, 2, 4), loss="ohem", weight_decay=5e-4,
    # eval.py: sliding window = the val crop, stride ceil(2/3 window).
    eval_mode="sliding_window", eval_window=769, eval_stride=513,
    model_kwargs=dict(low_level_channels=256, zero_init_residual=True))

# U2PL's supervised-only baselines ("SupOnly"; the numbers DGCL's tables quote).
U2PL_SUPONLY_VOC = dataclasses.replace(
    U2PL_VOC, source="Haochen-Wang409/U2PL experiments/pascal/1464/suponly/config.yaml",
    gpus=2, per_gpu_batch=8, semi=False, drop_last=False)
U2PL_SUPONLY_CITYSCAPES = dataclasses.replace(
    U2PL_CITYSCAPES, source="Haochen-Wang409/U2PL experiments/cityscapes/744/suponly/config.yaml",
    gpus=4, per_gpu_batch=4, semi=False, drop_last=False)


def voc(c: ml_collections.ConfigDict, protocol: str, split, *,
        recipe: Optional[Recipe] = None) -> ml_collections.ConfigDict:
  """PASCAL VOC 2012: protocol 'classic' (92..1464), 'blended_cps' or 'blended_u2pl' (1_16..).

  Args:
    c: a method config.
    protocol: see `semijax.data.splits.protocols('voc')`; '' infers it (`resolve`).
    split: e.g. 732 or '1/16'.
    recipe: the codebase's VOC recipe (default `U2PL_VOC`).

  Raises:
    ValueError: unknown protocol or split (the valid ones are listed).
  """
  return apply(c, "voc", protocol, split, recipe or U2PL_VOC)


def cityscapes(c: ml_collections.ConfigDict, split, *, protocol: str = "",
               recipe: Optional[Recipe] = None) -> ml_collections.ConfigDict:
  """Cityscapes: the CPS lists 1_16..1_2 (protocol 'cps') or UniMatch's 1_30 ('unimatch').

  Args:
    c: a method config.
    split: e.g. '1/8' or '1_30'.
    protocol: '' infers it from the split.
    recipe: the codebase's Cityscapes recipe (default `U2PL_CITYSCAPES`).

  Raises:
    ValueError: unknown protocol or split (the valid ones are listed).
  """
  return apply(c, "cityscapes", protocol, split, recipe or U2PL_CITYSCAPES)
