"""Cross-device helpers behind every public function's optional `axis_name`.

Contract (tested in `tests/test_collectives.py` and for every loss):

* Called under `jax.jit` (with or without a device mesh) and `axis_name=None`, inputs are
  the global batch and nothing here does anything.
* Called inside `jax.pmap` or `jax.shard_map` with `axis_name`, each device holds one shard
  of the batch. Values (losses, bank contents, random choices) are then the *global* ones,
  identical on every device, and the gradient that reaches a device's inputs is exactly
  that device's share of the gradient of the global value.

The second point is why values are combined with `stop_gradient` around the collective:
differentiating through `psum`/`all_gather` would multiply gradients by the device count
under `pmap` (but not under `shard_map`'s varying-axes typing), so the two transforms would
disagree. With the shares, `shard_map` (default `check_vma=True`) sums them into the
global parameter gradient by itself; under `pmap`, `lax.psum(grads, axis_name)` does.
"""

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax


def axis_size(axis_name: Optional[str]) -> int:
  """Number of devices along `axis_name` (1 when `axis_name` is None)."""
  return 1 if axis_name is None else lax.axis_size(axis_name)


def global_sum(x: jax.Array, axis_name: Optional[str]) -> jax.Array:
  """Sum of `x` over devices; the gradient goes to the local term only.

  Args:
    x: any array (typically a scalar partial sum).
    axis_name: mapped axis, or None for a no-op.

  Returns:
    `psum(x)` in value, `x` in gradient.
  """
  if axis_name is None:
    return x
  return x + lax.stop_gradient(lax.psum(x, axis_name) - x)


def all_gather(x: jax.Array, axis_name: Optional[str], *,
               differentiable: bool = True) -> jax.Array:
  """Concatenates the devices' leading-axis shards: `[n, ...] -> [D * n, ...]`.

  Args:
    x: the local shard, leading axis is the batch.
    axis_name: mapped axis, or None for a no-op.
    differentiable: if True, the rows that came from this device carry its gradient
      (the others are constants); if False, the whole result is a constant.

  Returns:
    The global array, rows ordered by device index, identical on every device.
  """
  if axis_name is None:
    return x if differentiable else lax.stop_gradient(x)
  gathered = lax.all_gather(lax.stop_gradient(x), axis_name, tiled=True)
  if not differentiable:
    return gathered
  start = lax.axis_index(axis_name) * x.shape[0]
  return lax.dynamic_update_slice_in_dim(gathered, x, start, axis=0)


def local_rows(x: jax.Array, axis_name: Optional[str]) -> jax.Array:
  """The inverse of `all_gather`: this device's `[n, ...]` slice of a `[D * n, ...]` array."""
  if axis_name is None:
    return x
  n = x.shape[0] // lax.axis_size(axis_name)
  return lax.dynamic_slice_in_dim(x, lax.axis_index(axis_name) * n, n, axis=0)


def same_rng(rng: jax.Array, axis_name: Optional[str]) -> jax.Array:
  """Returns the key of device 0 on every device.

  Random choices over the global batch (bank subsets, negatives) must be the same on every
  device; a user may hand each device a different key, so we broadcast one.
  """
  if axis_name is None:
    return rng
  data = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
  data = lax.all_gather(data, axis_name)[0]
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(rng))
  return data
