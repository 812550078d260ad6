"""Argument parsing and the `smoke` shrink shared by every config file.

A config file's `get_config(arg)` receives the text after the colon in
`--config=experiments/configs/<method>.py:<arg>`, e.g. `split=1/8,seed=1,smoke`.
"""

import ml_collections

# Arguments every config accepts, with their defaults.
COMMON_ARGS = dict(split="1/16", split_seed=0, seed=0, smoke=False, dataset="embedded")


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


def apply_common(c: ml_collections.ConfigDict, args: ml_collections.ConfigDict):
  """Sets split/seed from the arguments and applies the smoke shrink."""
  c.data.split = args.split
  c.data.split_seed = args.split_seed
  c.seed = args.seed
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
    c.data.embedded.num_train = 128
    c.data.embedded.num_val = 32
    c.data.embedded.canvas = 24
    c.data.embedded.digit_size = (14, 20)
    c.data.crop_size = 24
  if c.model.name == "deeplabv3plus_small":
    c.model.kwargs.widths = (8, 8, 16, 16)
    c.model.kwargs.stem_width = 8
  return c
