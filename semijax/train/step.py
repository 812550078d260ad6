"""The jitted train step, composed from pure pieces.

Order of operations: student/teacher forwards and losses (the method), gradient,
optimizer update, EMA teacher update with the scheduled keep-rate, method state update
(bank pushes see the features of this step, after the loss has read the old bank).
Randomness is `fold_in(key(seed), step)`: nothing hidden, so a resumed run repeats exactly.

Gradient accumulation (`train.grad_accum_steps` = A > 1): the loss and gradient of the first
stage are computed on A micro-batches of the global batch in a `lax.scan` (micro-batch a =
rows a, a + A, ... of every part, see `split_micro_batches`) and averaged; everything after
(optimizer, EMA, method state, non-finite guard) runs once per step, as without it:
  * loss, gradients, metrics: the mean over micro-batches (the global-batch value when every
    micro-batch has as many valid pixels, as PyTorch's per-GPU loss averaging);
  * BatchNorm running statistics (student, and a train-mode teacher): the mean of the A
    micro-batches' updates from the same old statistics, m old + (1 - m) mean_a(stat_a),
    i.e. the update of one forward pass over the global batch with A statistic groups;
  * extras: the micro-batches' rows put back in global-batch order (`merge_micro_batches`;
    0-d leaves are averaged), so `update_state` (bank pushes) runs once on the whole batch;
  * randomness: micro-batch a draws from `fold_in(fold_in(rng, crc32('grad_accum')), a)`.
    Per-batch random draws (CutMix boxes, dropout masks, anchor subsets) therefore differ
    from a one-step run; A x (B/A) equals one step of B exactly for steps without random
    draws and without batch-global selections (e.g. supervised with dropout off), given
    BatchNorm groups of the micro-batches' rows in the one-step run (test_grad_accum.py).
Splitting the sharded batch into micro-batches moves no data (measured: no all-gather or
all-to-all in the compiled step); on several devices XLA (CPU) all-reduces each micro-batch's
gradient inside the loop, i.e. A gradient all-reduces per step instead of one.
"""

import functools
import zlib
from typing import Any, Callable, Dict, Tuple

import jax
import jax.numpy as jnp
import optax

from semijax.methods import base
from semijax.train import schedules, state as state_lib

Batch = Dict[str, Dict[str, jax.Array]]

# Metric holding the step index of a non-finite update, or NO_NONFINITE; the host merges it
# over a logging window with `min` (not a sum), so it names the first bad step of the window.
FIRST_NONFINITE = "first_nonfinite_step"
NO_NONFINITE = 2**31 - 1


def prepare_batch(batch: Batch, fields=()) -> Tuple[Batch, Any]:
  """Device batch -> what a method sees, and the unlabeled images' hidden ground truth.

  uint8 images -> float32 in [0, 1]; labels -> int32 (the unlabeled part gets none); `pad`
  bool; the method's extra `fields` pass unchanged; host-only fields are dropped.

  Returns:
    `(batch, hidden)`: `hidden` is the unlabeled part's `hidden_label` as int32 `[B, H, W]`
    (255 where unknown), or None; it goes to `StepContext.hidden_labels`, never into `batch`.
  """
  out, hidden = {}, None
  for part, rec in batch.items():
    p = {"image": jnp.asarray(rec["image"], jnp.float32) / 255.0,
         "pad": jnp.asarray(rec["pad"], bool)}
    if part != "unlabeled":
      p["label"] = jnp.asarray(rec["label"], jnp.int32)
    elif "hidden_label" in rec:
      hidden = jnp.asarray(rec["hidden_label"], jnp.int32)
    for field in fields:
      if field in rec:
        p[field] = rec[field]
    out[part] = p
  return out, hidden


def _apply_fn(model, variables, images, train: bool, rngs, **kwargs):
  """Forward pass returning `(outputs, batch_stats)`; BN statistics update when training."""
  if train:
    outputs, mutated = model.apply(variables, images, train=True, rngs=rngs,
                                   mutable=["batch_stats"], **kwargs)
    return outputs, mutated["batch_stats"]
  return model.apply(variables, images, train=False, **kwargs), variables["batch_stats"]


def make_train_step(model, method: base.Method, config, *, warmup: bool = False) -> Callable:
  """Builds `step(state, batch) -> (state, metrics)` (not yet jitted).

  Args:
    model: the flax segmenter (with the method's heads attached).
    method: a `Method`.
    config: the run config (`seed`, `optim`, `train`, `ema`).
    warmup: build the supervised warm-up step used for the first
      `train.supervised_warmup_steps` steps (the official codes' supervised-only epochs):
      the labeled loss only, no unlabeled or teacher forward (so a warm-up step costs what a
      supervised step costs), method state untouched, and the teacher copying the student's
      parameters and BatchNorm statistics (keep-rate 0 before the EMA starts).

  Returns:
    A pure function; metrics are global scalars (means over the global batch).
  """
  lr_fn = schedules.poly_schedule(config.optim.base_lr, config.train.total_steps,
                                  power=config.optim.power,
                                  warmup_steps=config.optim.warmup_steps)
  ema_kwargs = dict(decay=config.ema.decay, warmup=config.ema.warmup,
                    start_step=config.train.supervised_warmup_steps + config.ema.copy_steps,
                    total_steps=config.train.total_steps)
  if warmup:
    from semijax.methods import supervised  # pylint: disable=g-import-not-at-top
    method = _Warmup(supervised.Supervised(config), method)
  teacher_train_mode = method.teacher_bn == "batch" and not warmup
  apply_fn = functools.partial(_apply_fn, model)

  accum = int(config.train.get("grad_accum_steps", 1) or 1)

  def step(state: state_lib.TrainState, batch: Batch) -> Tuple[state_lib.TrainState, Dict]:
    rng = jax.random.fold_in(jax.random.key(config.seed), state.step)
    batch = prepare_batch(batch, method.batch_fields)

    def loss_and_grad(batch, rng):
      batch, hidden = batch
      def teacher_fn(images, teacher_stats, **kwargs):
        variables = {"params": state.ema_params, "batch_stats": teacher_stats}
        rngs = {"dropout": jax.random.fold_in(rng, 7)}
        return apply_fn(variables, images, teacher_train_mode, rngs, **kwargs)

      def loss_fn(params):
        ctx = base.StepContext(batch=batch, rng=rng, step=state.step,
                               method_state=state.method_state, params=params,
                               batch_stats=state.batch_stats, student_fn=apply_fn,
                               teacher_fn=teacher_fn, teacher_batch_stats=state.ema_batch_stats,
                               hidden_labels=hidden)
        loss, metrics, extras = method.loss(ctx)
        return loss, (metrics, extras, ctx.batch_stats, ctx.teacher_batch_stats)

      (loss, (metrics, extras, batch_stats, teacher_stats)), grads = jax.value_and_grad(
          loss_fn, has_aux=True)(state.params)
      return loss, grads, metrics, extras, batch_stats, teacher_stats

    if accum == 1:
      loss, grads, metrics, extras, batch_stats, teacher_stats = loss_and_grad(batch, rng)
    else:
      loss, grads, metrics, extras, batch_stats, teacher_stats = accumulate(
          loss_and_grad, batch, rng, accum, teacher_stats=teacher_train_mode)
    # The global gradient norm is finite iff every gradient is (one reduction instead of a
    # check per leaf, which costs seconds of compile on a ResNet-101).
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

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
                   grad_norm=grad_norm, finite=finite.astype(jnp.float32))
    metrics[FIRST_NONFINITE] = jnp.where(finite, NO_NONFINITE, state.step).astype(jnp.int32)
    return new, metrics

  return step


class _Warmup(base.Method):
  """The supervised loss with the wrapped method's state passed through unchanged."""
  uses_unlabeled = False

  def __init__(self, supervised_method, method):
    super().__init__(method.config)
    self.name = f"{method.name}/warmup"
    self.teacher_bn = method.teacher_bn
    self.batch_fields = method.batch_fields
    self.loss = supervised_method.loss


def split_micro_batches(tree: Any, num: int) -> Any:
  """`[B, ...]` leaves -> `[num, B / num, ...]`; micro-batch a holds rows a, a + num, ...

  Strided rather than contiguous: with the batch sharded over n devices (B / n rows each, a
  multiple of `num`), every device holds B / (n num) rows of every micro-batch, so the split
  moves no data; and a micro-batch's rows do not depend on n. For a concatenation of parts
  (e.g. [labeled ; unlabeled]) each a multiple of `num` long, a micro-batch of the
  concatenation is the concatenation of the parts' micro-batches.
  """
  def split(x):
    if x.shape[0] % num:
      raise ValueError(f"batch of {x.shape[0]} rows does not split into {num} micro-batches")
    return jnp.swapaxes(x.reshape((x.shape[0] // num, num) + x.shape[1:]), 0, 1)
  return jax.tree.map(split, tree)


def merge_micro_batches(tree: Any) -> Any:
  """The inverse of `split_micro_batches`: `[num, b, ...]` -> `[num * b, ...]` rows."""
  def merge(x):
    return jnp.swapaxes(x, 0, 1).reshape((x.shape[0] * x.shape[1],) + x.shape[2:])
  return jax.tree.map(merge, tree)


def micro_batch_rng(rng: jax.Array, index: jax.typing.ArrayLike) -> jax.Array:
  """The key of micro-batch `index` of a step whose key is `rng`."""
  return jax.random.fold_in(jax.random.fold_in(rng, zlib.crc32(b"grad_accum") % 2**31),
                            index)


def accumulate(loss_and_grad: Callable, batch: Batch, rng: jax.Array, num: int, *,
               teacher_stats: bool) -> Tuple[Any, ...]:
  """Runs `loss_and_grad(micro_batch, micro_rng)` on `num` micro-batches and combines them.

  Args:
    loss_and_grad: `(batch, rng) -> (loss, grads, metrics, extras, batch_stats,
      teacher_stats)` of one forward/backward pass.
    batch: the global batch (every leaf `[B, ...]`).
    rng: the step's key.
    num: micro-batches.
    teacher_stats: whether the teacher's BN statistics are updated by the pass (a
      train-mode teacher) and so are averaged too; else None is returned for them.

  Returns:
    The same tuple for the whole batch: loss, gradients, metrics (float32) and BN
    statistics averaged over micro-batches; extras' rows merged in global-batch order
    (0-d extras averaged).
  """
  micro = split_micro_batches(batch, num)

  def one(index):
    mb = jax.tree.map(lambda x: x[index], micro)
    return loss_and_grad(mb, micro_batch_rng(rng, index))

  def parts(index):
    loss, grads, metrics, extras, batch_stats, t_stats = one(index)
    metrics = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)
    return (loss, grads, metrics, batch_stats, t_stats if teacher_stats else None), extras

  def body(carry, index):
    summed, extras = parts(index)
    return jax.tree.map(jnp.add, carry, summed), extras

  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(parts, 0)[0])
  carry, extras = jax.lax.scan(body, zeros, jnp.arange(num))
  loss, grads, metrics, batch_stats, t_stats = jax.tree.map(lambda x: x / num, carry)
  extras = jax.tree.map(lambda x: merge_micro_batches(x) if x.ndim >= 2 else jnp.mean(x, 0),
                        extras)
  return loss, grads, metrics, extras, batch_stats, t_stats


def init_variables(model, rng: jax.Array, image_shape) -> Tuple[Any, Any]:
  """Model params and batch stats for images of `image_shape` `[B, H, W, 3]`."""
  variables = model.init({"params": rng, "dropout": rng}, jnp.zeros(image_shape, jnp.float32),
                         train=False)
  return variables["params"], variables.get("batch_stats", {})
