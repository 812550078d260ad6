"""The jitted train step, composed from pure pieces.

Order of operations (STYLE.md): student/teacher forwards and losses (the method), gradient,
optimizer update, EMA teacher update with the scheduled keep-rate, method state update
(bank pushes see the features of this step, after the loss has read the old bank).
Randomness is `fold_in(key(seed), step)`: nothing hidden, so a resumed run repeats exactly.
"""

import functools
from typing import Any, Callable, Dict, Tuple

import jax
import jax.numpy as jnp
import optax

from semijax.methods import base
from semijax.train import schedules
from semijax.train import state as state_lib

Batch = Dict[str, Dict[str, jax.Array]]

# Metric holding the step index of a non-finite update, or NO_NONFINITE; the host merges it
# over a logging window with `min` (not a sum), so it names the first bad step of the window.
FIRST_NONFINITE = "first_nonfinite_step"
NO_NONFINITE = 2**31 - 1


def prepare_batch(batch: Batch) -> Batch:
  """uint8 images -> float32 in [0, 1]; labels -> int32; drops host-only fields."""
  out = {}
  for part, rec in batch.items():
    out[part] = {"image": jnp.asarray(rec["image"], jnp.float32) / 255.0,
                 "label": jnp.asarray(rec["label"], jnp.int32),
                 "pad": jnp.asarray(rec["pad"], bool)}
  return out


def _apply_fn(model, variables, images, train: bool, rngs, **kwargs):
  """Forward pass returning `(outputs, batch_stats)`; BN statistics update when training."""
  if train:
    outputs, mutated = model.apply(variables, images, train=True, rngs=rngs,
                                   mutable=["batch_stats"], **kwargs)
    return outputs, mutated["batch_stats"]
  return model.apply(variables, images, train=False, **kwargs), variables["batch_stats"]


def make_train_step(model, method: base.Method, config) -> Callable:
  """Builds `step(state, batch) -> (state, metrics)` (not yet jitted).

  Args:
    model: the flax segmenter (with the method's heads attached).
    method: a `Method`.
    config: the run config (`seed`, `optim`, `train`, `ema`).

  Returns:
    A pure function; metrics are global scalars (means over the global batch).
  """
  lr_fn = schedules.poly_schedule(config.optim.base_lr, config.train.total_steps,
                                  power=config.optim.power,
                                  warmup_steps=config.optim.warmup_steps)
  ema_kwargs = dict(decay=config.ema.decay, warmup=config.ema.warmup,
                    start_step=config.train.supervised_warmup_steps + config.ema.copy_steps,
                    total_steps=config.train.total_steps)
  teacher_train_mode = method.teacher_bn == "batch"
  apply_fn = functools.partial(_apply_fn, model)

  def step(state: state_lib.TrainState, batch: Batch) -> Tuple[state_lib.TrainState, Dict]:
    rng = jax.random.fold_in(jax.random.key(config.seed), state.step)
    batch = prepare_batch(batch)

    def teacher_fn(images, teacher_stats, **kwargs):
      variables = {"params": state.ema_params, "batch_stats": teacher_stats}
      rngs = {"dropout": jax.random.fold_in(rng, 7)}
      return apply_fn(variables, images, teacher_train_mode, rngs, **kwargs)

    def loss_fn(params):
      ctx = base.StepContext(batch=batch, rng=rng, step=state.step,
                             method_state=state.method_state, params=params,
                             batch_stats=state.batch_stats, student_fn=apply_fn,
                             teacher_fn=teacher_fn, teacher_batch_stats=state.ema_batch_stats)
      loss, metrics, extras = method.loss(ctx)
      return loss, (metrics, extras, ctx.batch_stats, ctx.teacher_batch_stats)

    (loss, (metrics, extras, batch_stats, teacher_stats)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    finite = jnp.isfinite(loss) & jnp.all(jnp.array(
        [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))

    new = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    keep_rate = state_lib.ema_decay(state.step, **ema_kwargs)
    if teacher_train_mode:
      new = new.replace(ema_batch_stats=teacher_stats)
    new = state_lib.update_teacher(new, keep_rate, include_batch_stats=not teacher_train_mode)
    new = new.replace(method_state=method.update_state(
        new.method_state, extras, jax.random.fold_in(rng, 11), state.step))

    # A non-finite loss or gradient never reaches the state: the update is skipped and
    # counted; the host stops the run at its next check when `train.nonfinite == 'stop'`.
    skipped = state.replace(step=state.step + 1, skipped_steps=state.skipped_steps + 1)
    new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, skipped)

    metrics = dict(metrics)
    metrics.update(loss=loss, lr=lr_fn(state.step), ema_keep_rate=keep_rate,
                   grad_norm=optax.tree.norm(grads), finite=finite.astype(jnp.float32))
    metrics[FIRST_NONFINITE] = jnp.where(finite, NO_NONFINITE, state.step).astype(jnp.int32)
    return new, metrics

  return step


def make_eval_logits_fn(model, params, batch_stats) -> Callable:
  """`images float [B, H, W, 3] -> logits [B, H, W, C]` at input resolution (eval mode)."""
  def logits_fn(images):
    outputs = model.apply({"params": params, "batch_stats": batch_stats}, images, train=False)
    return base.upsample_logits(outputs, images.shape[1:3])
  return logits_fn


def init_variables(model, rng: jax.Array, image_shape) -> Tuple[Any, Any]:
  """Model params and batch stats for images of `image_shape` `[B, H, W, 3]`."""
  variables = model.init({"params": rng, "dropout": rng}, jnp.zeros(image_shape, jnp.float32),
                         train=False)
  return variables["params"], variables.get("batch_stats", {})
