"""Optimizer and learning-rate schedules of the papers (SGD + momentum, poly decay)."""

from typing import Callable, Optional

import jax.numpy as jnp
import optax

from semijax.train import state as state_lib


def poly_schedule(base_lr: float, total_steps: int, *, power: float = 0.9,
                  warmup_steps: int = 0, end_lr: float = 0.0) -> Callable:
  """lr(t) = base * (1 - t / T) ** power, as every reference codebase (per iteration).

  Optional linear warm-up over the first `warmup_steps` steps (not used by the papers).
  """
  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    frac = jnp.clip(t / max(total_steps, 1), 0.0, 1.0)
    lr = (base_lr - end_lr) * (1.0 - frac) ** power + end_lr
    if warmup_steps > 0:
      lr = lr * jnp.minimum(1.0, (t + 1.0) / warmup_steps)
    return lr
  return schedule


def make_optimizer(*, name: str, base_lr: float, total_steps: int, head_lr_mult: float = 1.0,
                   momentum: float = 0.9, weight_decay: float = 1e-4, power: float = 0.9,
                   warmup_steps: int = 0, nesterov: bool = False,
                   params: Optional[dict] = None) -> optax.GradientTransformation:
  """SGD (PyTorch semantics: weight decay added to the gradient before momentum) or AdamW.

  The backbone trains at `base_lr` and everything else (decoder, heads) at
  `base_lr * head_lr_mult` (10 on VOC for U2PL/DGCL/DSSN, 1 on Cityscapes).
  """
  def one(mult):
    lr = poly_schedule(base_lr * mult, total_steps, power=power, warmup_steps=warmup_steps)
    if name == "sgd":
      return optax.chain(optax.add_decayed_weights(weight_decay),
                         optax.sgd(lr, momentum=momentum or None, nesterov=nesterov))
    if name == "adamw":
      return optax.adamw(lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer {name!r}; expected 'sgd' or 'adamw'")

  if head_lr_mult == 1.0 or params is None:
    return one(1.0)
  return optax.multi_transform({"backbone": one(1.0), "head": one(head_lr_mult)},
                               state_lib.param_labels(params))
