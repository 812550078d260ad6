"""DSSN (dual-level siamese structure network, CPLG).

    python -m experiments.train --config=experiments/configs/dssn.py:split=1/8 \\
        --workdir=runs/dssn_1_8
    # the official recipe on VOC / Cityscapes (needs ImageNet deep-stem weights):
    python -m experiments.train \\
        --config=experiments/configs/dssn.py:dataset=cityscapes,split=1/8,root=/data/cityscapes \\
        --config.model.pretrained=/weights/resnet101.pth --workdir=runs/dssn_city_1_8
Expected teacher mIoU: see the README results tables (paper: VOC 1464 81.18, Cityscapes 1/8 78.18).
"""

from experiments.configs import base, common, recipes

# UniMatch-style DeepLabv3+ of kunzhan/DSSN (`model/semseg/deeplabv3plus2fp.py`): 1x1 ASPP fusion,
# no dropout, bias-free decoder convs; its deep-stem max-pool rounds down.
_MODEL = dict(pool_ceil_mode=False, aspp_project_kernel=1, aspp_dropout=0.0,
              decoder_dropout=0.0, decoder_bias=False)
DSSN_VOC = recipes.Recipe(
    source="kunzhan/DSSN voc/configs/pascal.yaml",
    gpus=4, per_gpu_batch=2, epochs=100, base_lr=0.002, head_lr_mult=10.0, crop_size=513,
    output_stride=16, eval_mode="whole", model_kwargs=_MODEL)
DSSN_CITYSCAPES = recipes.Recipe(
    source="kunzhan/DSSN city/configs/cityscapes.yaml",   # 8 GPUs: `ngpus` in its training logs
    gpus=8, per_gpu_batch=1, epochs=240, base_lr=0.005, head_lr_mult=1.0, crop_size=801,
    output_stride=16, loss="ohem", model_kwargs=_MODEL,
    # `evaluate(..., 'sliding_window')`: window = crop, stride int(801 * 2/3).
    eval_mode="sliding_window", eval_window=801, eval_stride=534)


def official(c):
  """`city/DSSN.py`: no CPLG (threshold 0: every pixel) and, for the first 5 epochs, no s1/s2
  terms and a teacher that copies the student. VOC keeps the defaults (first step only)."""
  if c.data.dataset == "cityscapes":
    c.pseudo_label.rule = "confidence"
    c.pseudo_label.confidence.threshold = 0.0
    c.dssn.w2s_start_step = 5 * c.recipe.steps_per_epoch
    c.ema.copy_steps = 5 * c.recipe.steps_per_epoch


def get_config(arg: str = ""):
  args = common.parse_arg(arg)
  c = common.method(base.get_config(), "dssn", args)
  c.ema.decay = 0.996
  c.ema.warmup = "none"
  c.ema.copy_steps = 1       # official: EMA rate 0 at the very first step
  return common.apply_common(c, args, voc=DSSN_VOC, cityscapes=DSSN_CITYSCAPES,
                             official=official)
