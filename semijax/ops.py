"""Numerical building blocks shared by losses, samplers, banks and models.

Everything here is static-shape and jit-safe: selections are fixed-size top-k with a
validity mask, never boolean indexing.
"""

from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from semijax import collectives

IGNORE_INDEX = 255


def masked_mean(x: jax.typing.ArrayLike, mask: jax.typing.ArrayLike, *,
                axis_name: Optional[str] = None) -> jax.Array:
  """`sum(x * mask) / max(sum(mask), 1)` over all elements (and devices).

  Exactly 0 with finite (zero) gradients when the mask is empty. Computed in float32.

  Args:
    x: values, any shape.
    mask: bool or float weights, broadcastable to `x`.
    axis_name: mapped axis for a global mean inside `pmap`/`shard_map`.

  Returns:
    Scalar float32.
  """
  x = jnp.asarray(x, jnp.float32)
  mask = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), x.shape)
  num = collectives.global_sum(jnp.sum(jnp.where(mask > 0, x * mask, 0.0)), axis_name)
  den = collectives.global_sum(jnp.sum(mask), axis_name)
  return num / jnp.maximum(lax.stop_gradient(den), 1.0)


def l2_normalize(x: jax.typing.ArrayLike, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """`x / max(||x||, eps)` in float32 (PyTorch's `F.normalize` semantics)."""
  x = jnp.asarray(x, jnp.float32)
  norm = jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)


def entropy(probs: jax.typing.ArrayLike, axis: int = -1) -> jax.Array:
  """Shannon entropy in nats, `-sum p log p`, with `0 log 0 = 0`."""
  probs = jnp.asarray(probs, jnp.float32)
  return -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0),
                  axis=axis)


def valid_label_mask(labels: jax.typing.ArrayLike, ignore_index: int = IGNORE_INDEX) -> jax.Array:
  """`labels != ignore_index` (the only place the ignore value becomes a mask)."""
  return jnp.asarray(labels) != ignore_index


# ----------------------------------------------------------------------------------------
# Fixed-size selection.


def masked_top_k(scores: jax.typing.ArrayLike, mask: jax.typing.ArrayLike,
                 k: int) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """The `k` largest `scores` among entries where `mask` is True, along the last axis.

  Args:
    scores: `[..., N]` float.
    mask: `[..., N]` bool, the candidates.
    k: static number to select (`k <= N`).

  Returns:
    values `[..., k]` (float32, `-inf` where invalid), indices `[..., k]` int32 and
    valid `[..., k]` bool. When fewer than `k` candidates exist, the first
    `count` slots are valid and hold them in descending order of score.
  """
  scores = jnp.asarray(scores, jnp.float32)
  mask = jnp.asarray(mask, bool)
  # Every candidate must beat every non-candidate, even a candidate scored -inf.
  lowest = jnp.finfo(jnp.float32).min
  key = jnp.where(mask, jnp.maximum(scores, lowest / 2), lowest)
  _, idx = lax.top_k(key, k)
  idx = idx.astype(jnp.int32)
  valid = jnp.take_along_axis(mask, idx, axis=-1)
  values = jnp.where(valid, jnp.take_along_axis(scores, idx, axis=-1), -jnp.inf)
  return values, idx, valid


def masked_bottom_k(scores, mask, k):
  """The `k` smallest `scores` among candidates; values are returned un-negated."""
  values, idx, valid = masked_top_k(-jnp.asarray(scores, jnp.float32), mask, k)
  return jnp.where(valid, -values, jnp.inf), idx, valid


def random_subset(rng: jax.Array, mask: jax.typing.ArrayLike,
                  k: int) -> Tuple[jax.Array, jax.Array]:
  """Uniform random subset of at most `k` candidates, without replacement.

  Args:
    rng: PRNG key.
    mask: `[..., N]` bool candidates.
    k: static subset size.

  Returns:
    indices `[..., k]` int32 and valid `[..., k]` bool; all candidates are chosen
    (valid first) when there are at most `k` of them.
  """
  mask = jnp.asarray(mask, bool)
  # 31 random bits per item (float32 uniforms have 23: ties at ~1e5 candidates bias toward
  # low indices); candidates >= 0 beat non-candidates (-1).
  scores = (jax.random.bits(rng, mask.shape, jnp.uint32) >> 1).astype(jnp.int32)
  _, idx = lax.top_k(jnp.where(mask, scores, -1), k)
  idx = idx.astype(jnp.int32)
  return idx, jnp.take_along_axis(mask, idx, axis=-1)


# ----------------------------------------------------------------------------------------
# Resizing with PyTorch's semantics (the reference codebases' `F.interpolate`).


def _linear_weights(in_size: int, out_size: int, align_corners: bool) -> np.ndarray:
  """`[out, in]` matrix of 1-D linear interpolation weights."""
  out = np.arange(out_size, dtype=np.float64)
  if align_corners:
    src = out * ((in_size - 1) / (out_size - 1)) if out_size > 1 else np.zeros_like(out)
  else:
    src = np.maximum((out + 0.5) * (in_size / out_size) - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo
  weights = np.zeros((out_size, in_size), np.float64)
  np.add.at(weights, (np.arange(out_size), lo), 1.0 - frac)
  np.add.at(weights, (np.arange(out_size), hi), frac)
  return weights.astype(np.float32)


def resize_bilinear(x: jax.typing.ArrayLike, size: Sequence[int], *,
                    align_corners: bool = True) -> jax.Array:
  """Bilinear resize of `[B, H, W, C]` to `[B, h, w, C]`, as PyTorch's `F.interpolate`.

  `jax.image.resize` has no `align_corners` and antialiases when shrinking; the reference
  codebases upsample logits with `align_corners=True`. Written as two small matmuls, which
  is exact and fast on every backend. Output dtype follows the input.
  """
  x = jnp.asarray(x)
  h, w = int(size[0]), int(size[1])
  if x.shape[1:3] == (h, w):
    return x
  wh = jnp.asarray(_linear_weights(x.shape[1], h, align_corners), x.dtype)
  ww = jnp.asarray(_linear_weights(x.shape[2], w, align_corners), x.dtype)
  precision = lax.Precision.HIGHEST
  y = jnp.einsum('oh,bhwc->bowc', wh, x, precision=precision)
  return jnp.einsum('pw,bowc->bopc', ww, y, precision=precision)


def resize_nearest(labels: jax.typing.ArrayLike, size: Sequence[int]) -> jax.Array:
  """Nearest resize of `[B, H, W]` (or `[B, H, W, C]`) with PyTorch's legacy indexing.

  Source index is `floor(dst * in / out)`, as `F.interpolate(mode='nearest')`, which the
  reference codebases use to bring label maps down to feature resolution.
  """
  labels = jnp.asarray(labels)
  h, w = int(size[0]), int(size[1])
  rows = np.minimum(np.floor(np.arange(h) * (labels.shape[1] / h)).astype(np.int32),
                    labels.shape[1] - 1)
  cols = np.minimum(np.floor(np.arange(w) * (labels.shape[2] / w)).astype(np.int32),
                    labels.shape[2] - 1)
  return jnp.take(jnp.take(labels, rows, axis=1), cols, axis=2)
