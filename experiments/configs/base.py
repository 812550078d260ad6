"""Base config: every field every run shares, each with a one-line comment.

Method files (`experiments/configs/<method>.py`) start from `get_config()`, merge their
method's own block, its pseudo-label rule's and its terms' (`semijax.methods.configure`: the
blocks live with the method) and override only what differs. The ConfigDict is locked, so a
misspelt key (in a file or on the command line) is an error that lists the valid keys.

    python -m experiments.train --config=experiments/configs/supervised.py:split=1/16 \
        --workdir=runs/sup_1_16
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0                          # init, data order, augmentation and every per-step random choice

  c.method = ml_collections.ConfigDict()
  c.method.name = "supervised"        # a registered method (semijax.methods.names()); its block is merged in by its config file
  c.method.terms = ()                 # extra loss terms of a teacher-student method (semijax.methods.terms)

  c.data = ml_collections.ConfigDict()
  c.data.dataset = "embedded"         # embedded | voc | cityscapes | folder
  c.data.root = ""                    # dataset folder for voc / cityscapes / folder
  c.data.protocol = ""                # split family: voc classic|blended_cps|blended_u2pl, cityscapes cps|unimatch
  c.data.split = "1/16"               # labeled split: a fraction (1/16..1/2, full) or a list name (e.g. 732)
  c.data.split_seed = 0               # which random labeled subset (fraction splits only)
  c.data.val_fraction = 0.0           # custom folders without a val list: fraction held out for val
  c.data.label_format = "trainIds"    # cityscapes labels: trainIds | labelIds (mapped on the fly)
  c.data.crop_size = 32               # training crop side in pixels
  c.data.scale_range = (0.75, 1.25)   # random rescale factor range before cropping
  c.data.base_size = 0                # resize the long side to this before scaling (0: keep; CAC uses it)
  c.data.flip = False                 # random horizontal flip (off for digits: mirrored digits are other glyphs)
  c.data.labeled_batch = 16           # global labeled batch per step (all devices and processes)
  c.data.unlabeled_batch = 16         # global unlabeled batch per step (ignored by supervised; the papers: = labeled_batch)
  c.data.num_workers = 0              # grain worker processes (0: in the main process)
  c.data.eval_batch = 64              # global eval batch
  c.data.eval_size = ()               # pad eval images to (H, W) so batches share one shape; () keeps sizes
  c.data.embedded = ml_collections.ConfigDict()   # scene generator (semijax.data.embedded.SceneConfig)
  c.data.embedded.canvas = 32         # scene side in pixels
  c.data.embedded.num_train = 3200    # train pool size
  c.data.embedded.num_val = 640       # val set size
  c.data.embedded.digits_per_scene = (1, 1)   # inclusive range of digits per scene
  c.data.embedded.digit_size = (20, 30)       # inclusive range of digit sizes in pixels
  c.data.embedded.stroke_threshold = 0.3      # digit intensity above which a pixel is labelled
  c.data.embedded.background_blur = 1.5       # Gaussian sigma on the background photo
  c.data.embedded.background_contrast = 0.3   # fraction of the photo's contrast kept
  c.data.embedded.ink_alpha_gain = 1.6        # digit opacity = clip(gain * intensity, 0, 1)
  c.data.embedded.max_overlap = 0.15          # a digit may cover at most this fraction of earlier ones
  c.data.embedded.placement_tries = 20        # positions tried to respect max_overlap
  c.data.embedded.seed = 0            # scene generator seed (the dataset itself)

  c.model = ml_collections.ConfigDict()
  c.model.name = "deeplabv3plus_small"   # semijax.models.registry names
  c.model.dtype = "float32"           # compute dtype: bfloat16 on accelerators (params stay float32)
  c.model.pretrained = ""             # backbone weights: a .safetensors/.pth file, "embedded" (shipped; embedded configs) or "" / "none"
  c.model.remat = "none"              # none | blocks (keep conv outputs only) | full (keep block inputs): trade compute for memory
  c.model.kwargs = ml_collections.ConfigDict()    # backbone/segmenter arguments (stem, output_stride, ...)
  c.model.kwargs.widths = (32, 64, 96, 128)       # small backbone stage widths
  c.model.kwargs.stem_width = 32      # small backbone stem width
  c.model.kwargs.stem_stride = 2      # small backbone stem conv stride
  c.model.kwargs.stem_pool = True     # small backbone stem max-pool (stride 2)
  c.model.kwargs.output_stride = 8    # backbone output stride

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adamw"              # sgd (PyTorch semantics, the papers' recipes) | adamw (embedded benchmark)
  c.optim.base_lr = 0.003             # backbone learning rate
  c.optim.head_lr_mult = 1.0          # decoder/heads learning rate = base_lr * this
  c.optim.momentum = 0.9              # SGD momentum
  c.optim.weight_decay = 1e-4         # L2 weight decay (added to the gradient, as torch SGD)
  c.optim.power = 0.9                 # poly decay power
  c.optim.warmup_steps = 0            # linear LR warm-up steps (the papers use none)

  c.train = ml_collections.ConfigDict()
  c.train.total_steps = 1200          # optimizer steps
  c.train.supervised_warmup_steps = 300  # first steps supervised-only, at supervised cost (teacher copies student)
  c.train.log_every = 50              # steps between metric logs
  c.train.eval_every = 400            # steps between val evaluations of the teacher (0: only at the end)
  c.train.eval_student = True         # also evaluate the student during training
  c.train.checkpoint_every = 400      # steps between checkpoints (also saved at every eval and the end)
  c.train.keep_checkpoints = 2        # most recent checkpoints kept (plus the best by val mIoU)
  c.train.nonfinite = "stop"          # non-finite loss/grad: stop (last good checkpoint kept) | skip
  c.train.num_devices = 0             # devices in the data mesh (0: all; a multi-process run uses all)
  c.train.grad_accum_steps = 1        # micro-batches per optimizer step: the global batch is split, not multiplied
  c.train.sync_bn = True              # BatchNorm statistics over the whole (micro-)batch (SyncBN, official recipes)
  c.train.bn_groups = 0               # sync_bn=False: statistic groups per step = the recipe's GPUs (0: recipe.gpus, else devices x micro-batches)

  c.ema = ml_collections.ConfigDict()
  c.ema.decay = 0.99                  # teacher keep-rate
  c.ema.warmup = "u2pl"               # none | u2pl: min(1 - 1/(t+1), decay) | cosine (Alonso et al.)
  c.ema.copy_steps = 0                # steps after the supervised warm-up during which the teacher copies the student

  c.loss = ml_collections.ConfigDict()
  c.loss.supervised = "ce"            # ce | ohem (Cityscapes recipes)
  c.loss.ohem_thresh = 0.7            # OHEM probability threshold
  c.loss.ohem_min_kept = 100000       # OHEM minimum kept pixels per batch

  c.eval = ml_collections.ConfigDict()
  c.eval.mode = "whole"               # whole | center_crop | sliding_window
  c.eval.crop = 0                     # center_crop side
  c.eval.window = 0                   # sliding window side
  c.eval.stride = 0                   # sliding window stride (0: ceil(2/3 window))

  # What a run measures beyond its losses (semijax.methods.diagnostics).
  c.diagnostics = ml_collections.ConfigDict()
  c.diagnostics.pseudo_label_metrics = True   # precision/coverage vs the unlabeled images' hidden masks, when they exist
  c.diagnostics.oracle_pseudo_labels = False  # teach the unlabeled losses the true masks instead of the teacher's (oracle)

  # The recipe a config reproduces (published setting); the run warns when it differs.
  c.recipe = ml_collections.ConfigDict()
  c.recipe.global_batch = 0           # labeled images per step in the paper's setting (0: none)
  c.recipe.gpus = 0                   # GPUs of the published run
  c.recipe.base_lr = 0.0              # published base learning rate
  c.recipe.source = ""                # where the recipe comes from (config file of the official code)
  c.recipe.epochs = 0                 # published epochs (experiments/configs/recipes.py)
  c.recipe.steps_per_epoch = 0        # iterations per epoch as the official loader counts them
  return c
