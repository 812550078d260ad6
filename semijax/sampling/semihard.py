"""Semi-hard anchor sampling of ContrastiveSeg (Wang et al., ICCV 2021), as CSC uses it.

CSC ("Consistency and Separation Regularization for Contrastive Learning in Semi-supervised
Semantic Segmentation", Sec. III-B) samples its queries "following [4]" (ContrastiveSeg's
`_hard_anchor_sampling`), in the per-class variant of the CSC candidate code
(`KJingfdu/CS@212c80a`, `ContrastLoss._sampling`):

* per image b and class c, V_c views are drawn, V_c = `num_views_weak` (64) for the classes of a
  hard-coded "weak" list and `num_views` (16) for the others;
* a class is used in an image only when it has **more than** V_c pixels there (label = c);
* hard pixels are labelled c but predicted otherwise, easy ones labelled and predicted c. Half
  of the V_c views are hard and half easy (hard V_c // 2, easy the rest); when one kind is
  short (fewer than V_c / 2), all of it is taken and the other kind fills the rest;
* within each kind the pixels are a uniform random subset (`torch.randperm`).

Static shapes: `sample` returns `(SemiHardSelection, aux)`, `[B, C, Vmax]` pixel indices with a
validity mask (hard slots first, then easy), from one sort per image of `(class, easy, random
bits)`. Randomness is per
image, from `fold_in(rng, image_id)`, so a shard of the batch draws exactly what the global
batch would for its images (pass the global `image_ids` inside `pmap`/`shard_map`).
"""

from typing import NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from semijax import _deprecation, ops

# The CSC candidate code's weak-class lists (`get_contra_loss`).
VOC_WEAK_CLASSES = (2, 4, 5, 9, 11, 16, 18, 20)
CITYSCAPES_WEAK_CLASSES = (3, 4, 5, 6, 7, 9, 11, 12, 14, 15, 16, 17, 18)


class SemiHardSelection(NamedTuple):
  """Anchors per image and class (a pytree).

  Attributes:
    index: `[B, C, V]` int32 pixel index within its image (row-major over `h, w`).
    valid: `[B, C, V]` bool, drawn slots (a prefix of each row: hard first, then easy).
    hard: `[B, C, V]` bool, the slot holds a hard pixel (labelled c, predicted otherwise).
  """
  index: jax.Array
  valid: jax.Array
  hard: jax.Array


def views_per_class(num_classes: int, *, num_views: int = 16, num_views_weak: int = 64,
                    weak_classes: Sequence[int] = ()) -> Tuple[int, ...]:
  """V_c for every class: `num_views_weak` for `weak_classes`, `num_views` for the others.

  The CSC candidate code: `neg_num // 4` and `neg_num` (neg_num = 64).

  Raises:
    ValueError: a weak class outside `[0, num_classes)` or a count below 1.
  """
  if num_views < 1 or num_views_weak < 1:
    raise ValueError(f"num_views={num_views} and num_views_weak={num_views_weak} must be >= 1")
  bad = [c for c in weak_classes if not 0 <= c < num_classes]
  if bad:
    raise ValueError(f"weak_classes {bad} are outside [0, {num_classes})")
  return tuple(num_views_weak if c in set(weak_classes) else num_views
               for c in range(num_classes))


def sample(labels: jax.typing.ArrayLike, predictions: jax.typing.ArrayLike, rng: jax.Array, *,
           views: Sequence[int], valid: Optional[jax.typing.ArrayLike] = None,
           image_ids: Optional[jax.typing.ArrayLike] = None,
           ignore_index: int = ops.IGNORE_INDEX) -> Tuple[SemiHardSelection, dict]:
  """Semi-hard anchors: V_c pixels per image and class, half hard and half easy.

  Args:
    labels: `[B, h, w]` int labels at feature resolution (ground truth or pseudo-labels;
      `ignore_index` and values outside `[0, C)` are never drawn).
    predictions: `[B, h, w]` int, the student's argmax at the same resolution.
    rng: PRNG key; image b draws from `fold_in(rng, image_ids[b])`.
    views: V_c per class (length C, static), e.g. `views_per_class(...)`.
    valid: optional `[B, h, w]` bool candidates (default: every pixel).
    image_ids: optional `[B]` int, the images' indices in the global batch (default
      `arange(B)`); pass `axis_index * B + arange(B)` inside `pmap`/`shard_map` to draw what
      the global batch draws.
    ignore_index: label never drawn.

  Returns:
    `(selection, aux)`: a `SemiHardSelection` with `V = max(views)` (a class with at most V_c
    pixels in an image has no valid slot there, the official rule) and a flat dict of scalars:
    `num_anchors` (valid slots), `hard_ratio` (hard / valid slots) and `image_classes` (image
    and class pairs with anchors).
  """
  labels = jnp.asarray(labels, jnp.int32)
  predictions = jnp.asarray(predictions, jnp.int32)
  b = labels.shape[0]
  n = int(np.prod(labels.shape[1:]))
  c = len(views)
  vmax = int(max(views))
  lab = labels.reshape(b, n)
  pred = predictions.reshape(b, n)
  ok = (lab != ignore_index) & (lab >= 0) & (lab < c)
  if valid is not None:
    ok &= jnp.asarray(valid, bool).reshape(b, n)
  # Sort key: 2 c + easy for candidates (hard before easy within a class), 2 C otherwise.
  group = jnp.where(ok, 2 * lab + (pred == lab).astype(jnp.int32), 2 * c)
  if image_ids is None:
    image_ids = jnp.arange(b, dtype=jnp.int32)
  bits = jax.vmap(lambda i: jax.random.bits(jax.random.fold_in(rng, i), (n,), jnp.uint32))(
      jnp.asarray(image_ids, jnp.int32))
  iota = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
  _, _, perm = lax.sort((group, bits, iota), dimension=1, num_keys=2)
  counts = jax.vmap(lambda g: jnp.zeros((2 * c + 1,), jnp.int32).at[g].add(1))(group)
  starts = jnp.cumsum(counts, axis=1) - counts  # [B, 2C + 1]
  num_hard, num_easy = counts[:, 0:2 * c:2], counts[:, 1:2 * c:2]  # [B, C]
  start_hard, start_easy = starts[:, 0:2 * c:2], starts[:, 1:2 * c:2]
  v = jnp.asarray(views, jnp.int32)[None, :]  # [1, C]
  kept = num_hard + num_easy > v
  both = (2 * num_hard >= v) & (2 * num_easy >= v)
  easy_short = 2 * num_easy < v
  hard_keep = jnp.where(both, v // 2, jnp.where(easy_short, v - num_easy, num_hard))
  j = jnp.arange(vmax, dtype=jnp.int32)[None, None, :]
  is_hard = j < hard_keep[..., None]
  pos = jnp.where(is_hard, start_hard[..., None] + j,
                  start_easy[..., None] + j - hard_keep[..., None])
  sel_valid = kept[..., None] & (j < v[..., None])
  pos = jnp.clip(jnp.where(sel_valid, pos, 0), 0, n - 1)
  index = jnp.take_along_axis(perm, pos.reshape(b, c * vmax), axis=1).reshape(b, c, vmax)
  index = jnp.where(sel_valid, index, 0)
  selection = SemiHardSelection(index=index, valid=sel_valid, hard=is_hard & sel_valid)
  num = jnp.sum(sel_valid, dtype=jnp.float32)
  aux = {"num_anchors": num,
         "hard_ratio": jnp.sum(selection.hard, dtype=jnp.float32) / jnp.maximum(num, 1.0),
         "image_classes": jnp.sum(jnp.any(sel_valid, axis=-1), dtype=jnp.float32)}
  return selection, aux


def semi_hard_anchors(labels: jax.typing.ArrayLike, predictions: jax.typing.ArrayLike,
                      rng: jax.Array, *, views: Sequence[int],
                      valid: Optional[jax.typing.ArrayLike] = None,
                      image_ids: Optional[jax.typing.ArrayLike] = None,
                      ignore_index: int = ops.IGNORE_INDEX) -> SemiHardSelection:
  """Deprecated: `sample(...)[0]` (samplers return `(selection, aux)`)."""
  _deprecation.warn("semijax.sampling.semihard.semi_hard_anchors is deprecated and will be "
                    "removed in the next release; use semihard.sample, which returns "
                    "(selection, aux)")
  selection, _ = sample(labels, predictions, rng, views=views, valid=valid,
                        image_ids=image_ids, ignore_index=ignore_index)
  return selection
