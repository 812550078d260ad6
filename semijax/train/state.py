"""The train state: student, EMA teacher, optimizer, batch statistics and method state.

Everything that determines the future of a run lives here (plus the data iterator position,
which the checkpoint stores beside it), so a restored state continues exactly.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

PyTree = Any


class TrainState(train_state.TrainState):
  """`flax` TrainState with a teacher and a slot for method state.

  Attributes (beyond `step`, `params`, `opt_state`, `tx`, `apply_fn`):
    batch_stats: student BatchNorm running statistics.
    ema_params: EMA teacher parameters (same tree as `params`).
    ema_batch_stats: teacher BatchNorm statistics (EMA'd or the teacher's own, per method).
    method_state: method-specific pytree (memory banks, running thresholds), or {}.
    skipped_steps: int32 count of updates skipped because the loss or a gradient was not
      finite (`train.nonfinite = 'skip'`).
  """
  batch_stats: PyTree
  ema_params: PyTree
  ema_batch_stats: PyTree
  method_state: PyTree
  skipped_steps: jax.Array

  @classmethod
  def create(cls, *, apply_fn, params, tx, batch_stats, method_state=None, **kwargs):
    return super().create(apply_fn=apply_fn, params=params, tx=tx, batch_stats=batch_stats,
                          ema_params=params, ema_batch_stats=batch_stats,
                          method_state={} if method_state is None else method_state,
                          skipped_steps=jnp.zeros((), jnp.int32), **kwargs)


def ema_decay(step: jax.typing.ArrayLike, *, decay: float, warmup: str = "u2pl",
              start_step: int = 0, total_steps: int = 1) -> jax.Array:
  """EMA keep-rate for the update after optimizer step `step` (0-based).

  Args:
    step: current step (before increment).
    decay: nominal keep-rate (e.g. 0.999 DGCL, 0.996 DSSN, 0.99 mean teacher).
    warmup: 'none' (constant `decay`); 'u2pl' min(1 - 1/(t + 1), decay) with t = step -
      start_step, so the first step after `start_step` copies the student (U2PL, DGCL,
      CSC); 'cosine' Alonso et al.'s 1 - (1 - decay) (cos(pi t / T) + 1) / 2, capped by
      min(1 - 1/(10 t + 1), .).
    start_step: step at which the teacher starts following (end of supervised warm-up);
      before it the teacher copies the student (keep-rate 0).
    total_steps: T for the cosine schedule.

  Returns:
    float32 scalar keep-rate in [0, 1].
  """
  t = jnp.asarray(step, jnp.float32) - start_step
  decay = jnp.asarray(decay, jnp.float32)
  if warmup == "none":
    rate = decay
  elif warmup == "u2pl":
    rate = jnp.minimum(1.0 - 1.0 / (t + 1.0), decay)
  elif warmup == "cosine":
    span = max(total_steps - start_step, 1)
    rate = 1.0 - (1.0 - decay) * (jnp.cos(jnp.pi * t / span) + 1.0) / 2.0
    rate = jnp.minimum(1.0 - 1.0 / (10.0 * t + 1.0), rate)
  else:
    raise ValueError(f"ema warmup {warmup!r}; expected 'none', 'u2pl' or 'cosine'")
  return jnp.where(t < 0, 0.0, jnp.clip(rate, 0.0, 1.0))


def update_teacher(state: TrainState, keep_rate: jax.Array, *,
                   include_batch_stats: bool) -> TrainState:
  """teacher <- keep_rate * teacher + (1 - keep_rate) * student (`optax.incremental_update`).

  With `include_batch_stats` the BN statistics are EMA'd too (DSSN, mean teacher); else the
  caller keeps the teacher's own statistics (U2PL/DGCL teacher in train mode).
  """
  step_size = 1.0 - keep_rate
  ema_params = optax.incremental_update(state.params, state.ema_params, step_size)
  ema_batch_stats = state.ema_batch_stats
  if include_batch_stats:
    ema_batch_stats = optax.incremental_update(state.batch_stats, state.ema_batch_stats,
                                               step_size)
  return state.replace(ema_params=ema_params, ema_batch_stats=ema_batch_stats)


def num_params(tree: PyTree) -> int:
  """Number of scalars in a parameter tree."""
  return int(sum(x.size for x in jax.tree.leaves(tree)))


def param_labels(params: PyTree, backbone_prefix: str = "backbone") -> PyTree:
  """'backbone' for parameters under the backbone submodule, 'head' for the rest."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  labels = {k: ("backbone" if k[0] == backbone_prefix else "head") for k in flat}
  return flax.traverse_util.unflatten_dict(labels)
