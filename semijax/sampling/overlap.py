"""Pixel-to-pixel pairs between two overlapping crops of one image, at feature resolution.

CAC (Lai et al., CVPR 2021) crops two patches of one unlabeled image whose offset is a multiple
of the feature stride s (`semijax.data.pair_crops.PairCrops`), flips each independently, and
compares the two feature maps on their overlap. With crop tops/lefts (y1, x1) and (y2, x2) in
the resized image, feature pixel (i, j) of view 1 (flip undone) and feature pixel
(i - dy, j - dx) of view 2 (flip undone) cover the same s x s image block, where

    dy = (y2 - y1) / s,   dx = (x2 - x1) / s        (integers: the offsets are multiples of s).

Everything here is static-shape: view 2 is gathered onto view 1's grid, and a `[B, h, w]` mask
says which positions have a partner (inside both crops, neither block touching padding).
Pure jax; no `axis_name` needed (every operation is per image).
"""

from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp

from semijax import _deprecation

PyTree = Any


def unflip(x: jax.typing.ArrayLike, flip: jax.typing.ArrayLike) -> jax.Array:
  """Undoes a horizontal flip per image: `[B, h, w, ...]`, `flip` `[B]` bool."""
  x = jnp.asarray(x)
  flip = jnp.asarray(flip, bool).reshape((-1,) + (1,) * (x.ndim - 1))
  return jnp.where(flip, jnp.flip(x, axis=2), x)


def feature_offsets(boxes: jax.typing.ArrayLike, stride: int) -> jax.Array:
  """`(dy, dx)` of view 2 relative to view 1 in feature pixels.

  Args:
    boxes: `[B, 2, 4]` int crop boxes `(top, left, bottom, right)` of views 1 and 2 in the
      (resized, padded) image.
    stride: the feature stride s; the offsets must be multiples of it (`PairCrops` guarantees
      it), else the pairs are misaligned by the remainder.

  Returns:
    `[B, 2]` int32.
  """
  boxes = jnp.asarray(boxes, jnp.int32)
  return (boxes[:, 1, :2] - boxes[:, 0, :2]) // stride


def valid_blocks(valid: jax.typing.ArrayLike, stride: int) -> jax.Array:
  """`[B, H, W]` pixel validity -> `[B, H/s, W/s]`, True where a whole s x s block is valid.

  The official CAC bounds the overlap by the image's extent rounded down to the stride, i.e.
  keeps exactly the feature pixels whose whole block is image (no padding).

  Args:
    valid: `[B, H, W]` bool, True on real pixels (e.g. `~record["pad"]`).
    stride: the feature stride s (H and W must be multiples of it).

  Returns:
    `[B, H/s, W/s]` bool.
  """
  valid = jnp.asarray(valid, bool)
  b, h, w = valid.shape
  if h % stride or w % stride:
    raise ValueError(f"mask of {h}x{w} pixels is not a multiple of stride {stride}")
  blocks = valid.reshape(b, h // stride, stride, w // stride, stride)
  return jnp.all(blocks, axis=(2, 4))


def block_valid(pad: jax.typing.ArrayLike, stride: int) -> jax.Array:
  """Deprecated (True-means-drop argument): `valid_blocks(~pad, stride)`."""
  _deprecation.warn("semijax.sampling.overlap.block_valid(pad, stride) is deprecated and will "
                    "be removed in the next release; use valid_blocks(~pad, stride)")
  return valid_blocks(_deprecation.invert_mask(pad), stride)


def align_to_first(x2: jax.typing.ArrayLike, offsets: jax.typing.ArrayLike,
                   valid2: Optional[jax.typing.ArrayLike] = None) -> Tuple[jax.Array, jax.Array]:
  """View 2's values on view 1's grid: `out[b, i, j] = x2[b, i - dy, j - dx]`.

  Args:
    x2: `[B, h, w, ...]` view 2 (flip undone).
    offsets: `[B, 2]` `(dy, dx)` from `feature_offsets`.
    valid2: optional `[B, h, w]` bool validity of view 2's pixels.

  Returns:
    `(aligned [B, h, w, ...], inside [B, h, w] bool)`: `inside` is False where (i - dy, j - dx)
    falls outside view 2 (or on an invalid pixel); `aligned` holds a clipped neighbour there.
  """
  x2 = jnp.asarray(x2)
  offsets = jnp.asarray(offsets, jnp.int32)
  _, h, w = x2.shape[:3]
  rows = jnp.arange(h, dtype=jnp.int32)[None, :] - offsets[:, :1]   # [B, h]
  cols = jnp.arange(w, dtype=jnp.int32)[None, :] - offsets[:, 1:]   # [B, w]
  inside = (((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :])
  rows, cols = jnp.clip(rows, 0, h - 1), jnp.clip(cols, 0, w - 1)

  def take(x):
    x = jnp.take_along_axis(x, rows.reshape(rows.shape + (1,) * (x.ndim - 2)), axis=1)
    return jnp.take_along_axis(x, cols[:, None].reshape((cols.shape[0], 1, w)
                                                        + (1,) * (x.ndim - 3)), axis=2)

  aligned = take(x2)
  if valid2 is not None:
    inside &= take(jnp.asarray(valid2, bool))
  return aligned, inside


def pair_views(view1: PyTree, view2: PyTree, boxes: jax.typing.ArrayLike,
               flips: jax.typing.ArrayLike, *, stride: int,
               valid1: Optional[jax.typing.ArrayLike] = None,
               valid2: Optional[jax.typing.ArrayLike] = None) -> Tuple[PyTree, PyTree, jax.Array]:
  """Both views' feature-resolution maps with flips undone and view 2 moved onto view 1's grid.

  Args:
    view1, view2: pytrees of `[B, h, w, ...]` maps (projections, labels, confidences, ...) of
      the two crops as the network saw them (flipped where `flips` says).
    boxes: `[B, 2, 4]` crop boxes (`PairCrops`' `pair_boxes`).
    flips: `[B, 2]` bool (`PairCrops`' `pair_flips`).
    stride: feature stride of the maps (crop side / h).
    valid1, valid2: optional `[B, h, w]` bool masks in each view's own (flipped) layout, e.g.
      `valid_blocks(~pad, stride)`.

  Returns:
    `(view1', view2', pair_valid)`: `view1'` unflipped, `view2'` unflipped and aligned so that
    position (i, j) of both is the same image block; `pair_valid` `[B, h, w]` marks positions
    in the overlap of the two crops where both blocks are valid.
  """
  flips = jnp.asarray(flips, bool)
  view1 = jax.tree.map(lambda x: unflip(x, flips[:, 0]), view1)
  view2 = jax.tree.map(lambda x: unflip(x, flips[:, 1]), view2)
  offsets = feature_offsets(boxes, stride)
  leaf = jax.tree.leaves(view1)[0]
  shape = leaf.shape[:3]
  v1 = jnp.ones(shape, bool) if valid1 is None else unflip(valid1, flips[:, 0])
  v2 = jnp.ones(shape, bool) if valid2 is None else unflip(valid2, flips[:, 1])
  view2 = jax.tree.map(lambda x: align_to_first(x, offsets)[0], view2)
  _, inside = align_to_first(v2, offsets, v2)
  return view1, view2, inside & v1
