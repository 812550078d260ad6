"""Argument parsing and the `smoke` shrink shared by every config file.

A config file's `get_config(arg)` receives the text after the colon in
`--config=experiments/configs/<method>.py:<arg>`, e.g. `split=1/8,seed=1,smoke` or
`dataset=voc,protocol=classic,split=732,root=/data/VOC2012`.
"""

from typing import Optional, Tuple

import ml_collections

from experiments.configs import recipes
from semijax import methods

# Arguments every config accepts, with their defaults.
COMMON_ARGS = dict(split="1/16", split_seed=0, seed=0, smoke=False, dataset="embedded",
                   protocol="", root="", terms="")

DATASETS = ("embedded",) + recipes.DATASETS


def parse_arg(arg: str, **defaults) -> ml_collections.ConfigDict:
  """Parses `a=1,b=x,flag` into a ConfigDict, typed by `defaults` (big_vision style).

  Raises:
    ValueError: for an argument not in `defaults`, listing the valid ones.
  """
  defaults = {**COMMON_ARGS, **defaults}
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; valid: {sorted(defaults)}")
    default = defaults[key]
    if isinstance(default, bool):
      out[key] = value.lower() in ("", "1", "true", "yes")
    elif isinstance(default, int):
      out[key] = int(value)
    elif isinstance(default, float):
      out[key] = float(value)
    else:
      out[key] = value
  return out


def terms(args) -> Optional[Tuple[str, ...]]:
  """The `terms=a+b` argument: None (the method's own), () for `terms=none`, else the names."""
  if not args.terms:
    return None
  if args.terms == "none":
    return ()
  return tuple(t for t in args.terms.split("+") if t)


def method(c: ml_collections.ConfigDict, name: str, args) -> ml_collections.ConfigDict:
  """`semijax.methods.configure` with the `terms=` argument (a ValueError names bad ones)."""
  return methods.configure(c, name, terms=terms(args))


def apply_common(c: ml_collections.ConfigDict, args: ml_collections.ConfigDict, *,
                 voc=None, cityscapes=None, official=None):
  """Sets dataset, split and seeds from the arguments, then applies the smoke shrink.

  Args:
    c: the method's config.
    args: `parse_arg`'s result.
    voc, cityscapes: the method's `recipes.Recipe` on that dataset (None: the default one).
    official: optional `fn(c)` applying the method's own official settings on voc/cityscapes,
      after the dataset recipe (`c.recipe.steps_per_epoch` is set) and before `smoke`.

  Raises:
    ValueError: an unknown dataset, protocol or split (the valid ones are listed), or
      `protocol`/`root` given for the embedded data.
  """
  c.data.split_seed = args.split_seed
  c.seed = args.seed
  if args.dataset == "embedded":
    if args.protocol or args.root:
      raise ValueError("protocol= and root= apply to dataset=voc|cityscapes|folder; the embedded "
                       "data takes split=1/16|1/8|1/4|1/2|full")
    c.data.split = args.split
    # The embedded benchmark starts from the shipped pretrained backbone (the papers' ImageNet
    # start, BUILD_NOTES "Embedded benchmark regime"); `--config.model.pretrained=none` trains
    # from scratch.
    c.model.pretrained = "embedded"
  elif args.dataset == "folder":
    # A custom folder (semijax/data/folder.py): split= is a fraction (1/8, 0.125, full) or
    # `explicit` (dataset.json's splits.labeled); the base config's model and schedule apply.
    if args.protocol:
      raise ValueError("protocol= applies to dataset=voc|cityscapes; dataset=folder takes "
                       "root=<folder with dataset.json> and split=<fraction like 1/8>|explicit")
    if not args.root:
      raise ValueError("dataset=folder needs root=<the folder holding dataset.json, images/ and "
                       "masks/>, e.g. dataset=folder,root=/data/my_set,split=1/8")
    if args.split != "explicit":
      from semijax.data.datasets import parse_fraction  # pylint: disable=g-import-not-at-top
      parse_fraction(args.split, name="split")   # refuse a bad fraction now, naming it
    c.data.dataset = "folder"
    c.data.split = args.split
  elif args.dataset == "voc":
    recipes.voc(c, args.protocol, args.split, recipe=voc)
  elif args.dataset == "cityscapes":
    recipes.cityscapes(c, args.split, protocol=args.protocol, recipe=cityscapes)
  else:
    raise ValueError(f"dataset={args.dataset!r}; valid: {', '.join(DATASETS + ('folder',))}")
  if args.dataset != "embedded":
    c.data.root = args.root
  if args.dataset in recipes.DATASETS and official is not None:
    official(c)
  if args.smoke:
    smoke(c)
  return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a run to seconds on a CPU: tiny data, model and step count (tests, CI)."""
  c.train.total_steps = 4
  c.train.log_every = 2
  c.train.eval_every = 4
  c.train.checkpoint_every = 2
  c.data.labeled_batch = 8
  c.data.unlabeled_batch = 8
  c.data.eval_batch = 16
  if c.data.dataset == "embedded":
    c.train.supervised_warmup_steps = 0
    c.data.embedded.num_train = 128
    c.data.embedded.num_val = 32
    c.data.embedded.canvas = 24
    c.data.embedded.digit_size = (14, 20)
    c.data.crop_size = 24
  else:
    # The recipes' epoch-long schedules would outlast the 4 steps.
    c.train.supervised_warmup_steps = min(c.train.supervised_warmup_steps, 1)
    c.ema.copy_steps = min(c.ema.copy_steps, 1)
    if "pseudo_label" in c:
      for rule in c.pseudo_label.values():
        if hasattr(rule, "keys") and "steps_per_epoch" in rule:
          rule.steps_per_epoch = min(rule.steps_per_epoch, 1)
  methods.smoke(c)
  if c.model.name == "deeplabv3plus_small":
    c.model.kwargs.widths = (8, 8, 16, 16)
    c.model.kwargs.stem_width = 8
    c.model.pretrained = ""   # the shipped weights are for the full-size small model
  return c
