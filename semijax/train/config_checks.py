"""Config checks: every field known, of the right type and in range, before anything runs.

`check_config(config, reference)` names the first bad field (with a close match for a typo and
the valid choices); `recipe_warnings` lists where a run's data-parallel layout departs from the
published recipe its config reproduces.
"""

import contextlib
import difflib

from semijax import methods
from semijax.data import datasets
from semijax.data.sources import DataError


class ConfigError(ValueError):
  """A config field is unknown, of the wrong type, or has an invalid value (named)."""


# Free-form sub-configs: their keys are arguments of the component they configure, which
# checks them itself (e.g. `model.kwargs` goes to the backbone builder).
FREE_FORM = ("model.kwargs",)

_CHOICES = {
    "train.nonfinite": ("stop", "skip"),
    "ema.warmup": ("none", "u2pl", "cosine"),
    "eval.mode": ("whole", "center_crop", "sliding_window"),
    "optim.name": ("sgd", "adamw"),
    "data.dataset": datasets.DATASETS,
}
_AT_LEAST = {
    "train.total_steps": 1, "train.log_every": 1, "train.eval_every": 0,
    "train.checkpoint_every": 0, "train.keep_checkpoints": 1, "train.num_devices": 0,
    "train.grad_accum_steps": 1, "train.bn_groups": 0, "train.supervised_warmup_steps": 0,
    "data.labeled_batch": 1, "data.unlabeled_batch": 0, "data.eval_batch": 1,
    "data.crop_size": 1, "data.num_workers": 0,
}


def _type_name(x) -> str:
  return "a config dict" if hasattr(x, "keys") else type(x).__name__


def _same_kind(value, ref) -> bool:
  if ref is None or value is None:
    return True
  if hasattr(ref, "keys"):
    return hasattr(value, "keys")
  if isinstance(ref, bool) or isinstance(value, bool):
    return isinstance(ref, bool) and isinstance(value, bool)
  if isinstance(ref, float):
    return isinstance(value, (int, float))
  if isinstance(ref, int):
    return isinstance(value, int)
  if isinstance(ref, (tuple, list)):
    return isinstance(value, (tuple, list))
  return isinstance(value, type(ref))


def _check_schema(config, reference, prefix: str = "") -> None:
  for key in config.keys():
    name = f"{prefix}{key}"
    if key not in reference:
      close = difflib.get_close_matches(key, list(reference.keys()), n=1)
      raise ConfigError(
          f"unknown config field {name!r}" + (f" (did you mean {prefix + close[0]!r}?)"
                                             if close else "")
          + f"; valid fields{' of ' + prefix[:-1] if prefix else ''}: "
          f"{sorted(reference.keys())}")
    value, ref = config[key], reference[key]
    if not _same_kind(value, ref):
      raise ConfigError(f"config.{name}={value!r} is {_type_name(value)}; expected "
                        f"{_type_name(ref)} like the default {ref!r}")
    if hasattr(value, "keys") and name not in FREE_FORM:
      _check_schema(value, ref, name + ".")


def _get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    if not hasattr(node, "keys") or part not in node:
      return None
    node = node[part]
  return node


def check_config(config, reference=None) -> None:
  """Raises `ConfigError` naming the first bad field of `config`.

  Args:
    config: the run config.
    reference: optional config holding every valid field with a value of the right type
      (`experiments/configs/base.py:get_config()`): a field it lacks is unknown (a close
      match is suggested), and a value of another type is refused (an int is accepted
      where a float is expected). Sub-configs in `FREE_FORM` are not compared.
  """
  if reference is not None:
    # The method's, its rule's and its terms' blocks are valid fields too.
    try:
      reference = methods.reference_config(reference, config)
    except ValueError as e:
      raise ConfigError(str(e)) from e
    _check_schema(config, reference)
  for name, choices in _CHOICES.items():
    value = _get(config, name)
    if value is not None and value not in choices:
      raise ConfigError(f"config.{name}={value!r}; expected one of {list(choices)}")
  for name, low in _AT_LEAST.items():
    value = _get(config, name)
    if value is None:
      continue
    if isinstance(value, bool) or not isinstance(value, int):
      raise ConfigError(f"config.{name}={value!r} is {_type_name(value)}; expected an integer")
    if value < low:
      raise ConfigError(f"config.{name}={value}; expected an integer >= {low}")


@contextlib.contextmanager
def as_config_error():
  """Builders refuse a bad config value with ValueError/TypeError; name them ConfigError."""
  try:
    yield
  except DataError:
    raise
  except (ValueError, TypeError) as e:
    raise ConfigError(str(e)) from e


def recipe_warnings(config, mesh) -> list:
  """Differences between this run's data-parallel layout and the recipe it reproduces.

  The global batch per optimizer step is `data.labeled_batch` whatever the number of
  devices, processes or micro-batches (`train.grad_accum_steps` splits it, it does not
  multiply it), so the device count alone never changes the result with SyncBN; what does
  is a different global batch or learning rate, and where BatchNorm statistics are taken.
  """
  recipe = config.get("recipe")
  if not recipe or not recipe.get("global_batch"):
    return []
  out = []
  ours = config.data.labeled_batch
  accum = int(config.train.get("grad_accum_steps", 1) or 1)
  gpus = recipe.get("gpus") or 0
  per_gpu = f" ({gpus} GPUs x {recipe.global_batch // gpus})" if gpus else ""
  if ours != recipe.global_batch:
    scaled = recipe.base_lr * ours / recipe.global_batch
    out.append(
        f"global labeled batch {ours} differs from the recipe's {recipe.global_batch}"
        f"{per_gpu}. Published numbers assume the recipe's batch: keep "
        f"data.labeled_batch={recipe.global_batch} (with train.grad_accum_steps to fit "
        f"memory) or scale the LR linearly to optim.base_lr={scaled:g}.")
  elif config.optim.base_lr != recipe.base_lr:
    out.append(f"optim.base_lr={config.optim.base_lr:g} differs from the recipe's "
               f"{recipe.base_lr:g} at the same global batch")
  sync = bool(config.train.get("sync_bn", True))
  if sync and accum > 1:
    out.append(
        f"with train.grad_accum_steps={accum} BatchNorm statistics are taken over micro-batches "
        f"of {ours // accum} labeled images, not over the global batch of {ours} as the "
        "recipe's SyncBN; the closer the micro-batch to the global batch the closer the run")
  if not sync:
    groups = int(config.train.get("bn_groups", 0) or 0) or gpus or (mesh.devices.size * accum)
    if gpus and groups != gpus:
      out.append(f"train.bn_groups={groups} BatchNorm groups per step differ from the recipe's "
                 f"{gpus} GPUs (unsynchronised BN: {ours // groups} vs "
                 f"{recipe.global_batch // gpus} images per statistic)")
  return out
