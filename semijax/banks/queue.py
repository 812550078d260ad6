"""A class-agnostic FIFO queue of past features: the negative memory of CAC (and MoCo-style keys).

The queue keeps the K most recently pushed items of named fields (e.g. CAC: `feature` [128] and
`label` [] of the unlabeled pixels of the last steps). It is a `fifo.ClassBank` with one class, so
it has the same pytree layout, write semantics (FIFO, the newest K survive an over-full push,
invalid items skipped) and device behaviour (replicated, pushes all-gathered), and it lives in
the train state, donated and checkpointed.

    queue = init(capacity=51200, spec={"feature": ((128,), jnp.float32),
                                       "label": ((), jnp.int32)})
    entries, valid = read(queue)                  # [K, ...] fields, [K] bool
    queue = push(queue, {"feature": f, "label": y}, valid=v)   # after the optimizer step

CAC (Lai et al., CVPR 2021) keeps the gathered features of the last `step_save` steps as extra
negatives; a queue of `step_save x (items per step)` slots holds exactly those once full.
"""

from typing import Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp

from semijax import collectives
from semijax.banks import fifo

Queue = fifo.ClassBank


def init(capacity: int, spec: fifo.Spec) -> Queue:
  """An empty queue of `capacity` slots.

  Args:
    capacity: K, items kept (> 0).
    spec: field name -> `(trailing shape, dtype)`.

  Returns:
    A one-class `ClassBank` (fields `[1, K, ...]`, `ptr`/`count` `[1]`).
  """
  if capacity <= 0:
    raise ValueError(f"queue capacity must be > 0, got {capacity}")
  return fifo.init(1, capacity, spec)


def capacity(queue: Queue) -> int:
  """K (static)."""
  return queue.capacity


def read(queue: Queue) -> Tuple[Dict[str, jax.Array], jax.Array]:
  """The slots and their validity, in ring-buffer order (the order does not matter to a sum).

  Returns:
    `(entries, valid)`: field name -> `[K, ...]`, `valid` `[K]` bool (the first `count`).
  """
  entries, valid = fifo.read(queue)
  return {name: value[0] for name, value in entries.items()}, valid[0]


def count(queue: Queue) -> jax.Array:
  """Scalar int32: valid items."""
  return queue.count[0]


def push(queue: Queue, entries: Mapping[str, jax.typing.ArrayLike],
         valid: Optional[jax.typing.ArrayLike] = None, *,
         axis_name: Optional[str] = None) -> Queue:
  """Appends the valid items in order; once full, the oldest are overwritten.

  If more than K valid items come in one push, only the last K are kept, as K sequential pushes
  would leave them. Gradients never flow into the queue.

  Args:
    queue: the queue.
    entries: every field of the queue -> `[N, ...]` items (a device's shard under `axis_name`).
    valid: `[N]` bool (default: all).
    axis_name: inside `pmap`/`shard_map`, items are all-gathered first (device order, i.e.
      global batch order) so every device writes the same items and queues stay identical.

  Returns:
    The updated queue.
  """
  if set(entries) != set(queue.entries):
    raise ValueError(f"fields {sorted(entries)} do not match the queue's "
                     f"{sorted(queue.entries)}")
  items = {name: collectives.all_gather(jnp.asarray(v), axis_name, differentiable=False)
           for name, v in entries.items()}
  n = next(iter(items.values())).shape[0]
  if valid is None:
    valid = jnp.ones((n,), bool)
  else:
    valid = collectives.all_gather(jnp.asarray(valid, bool).reshape(-1), axis_name,
                                   differentiable=False)
  return fifo.write(queue, {name: v[None] for name, v in items.items()}, valid[None])
