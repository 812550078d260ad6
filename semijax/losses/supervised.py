"""Pixel-wise cross-entropy losses: plain, pseudo-label (masked) and OHEM.

All take logits `[B, H, W, C]` (any float dtype; computed in float32) and integer labels
`[B, H, W]` with `ignore_index` marking pixels that never count, and return `(loss, aux)`.
"""

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from semijax import _deprecation, collectives, ops

REDUCTIONS = ("selected", "all", "u2pl")


def pixel_cross_entropy(logits: jax.typing.ArrayLike, labels: jax.typing.ArrayLike, *,
                        ignore_index: int = ops.IGNORE_INDEX) -> jax.Array:
  """Unreduced `-log softmax(logits)[label]`, 0 at ignored pixels.

  Args:
    logits: `[..., C]`.
    labels: `[...]` int, values in `[0, C)` or `ignore_index`.

  Returns:
    `[...]` float32.
  """
  logits = jnp.asarray(logits, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  valid = labels != ignore_index
  safe = jnp.where(valid, labels, 0)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  return jnp.where(valid, nll, 0.0)


def cross_entropy_loss(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    mask: Optional[jax.typing.ArrayLike] = None,
    *,
    ignore_index: int = ops.IGNORE_INDEX,
    reduction: str = "selected",
    normalizer_mask: Optional[jax.typing.ArrayLike] = None,
    axis_name: Optional[str] = None,
) -> Tuple[jax.Array, dict]:
  """Masked pixel cross-entropy, the supervised and pseudo-label loss of every method.

  With selection s_i = mask_i * [y_i != ignore] and per-pixel CE l_i:

    selected: sum_i s_i l_i / sum_i s_i                 (PyTorch `CrossEntropyLoss`)
    all:      sum_i s_i l_i / N                         (Alonso et al.: ignored pixels count)
    u2pl:     sum_i s_i l_i / sum_i s_i * N / sum_i s_i  (U2PL/DGCL unsupervised weighting)

  where N counts all pixels, or the pixels of `normalizer_mask` when given (DSSN divides by
  the non-padding pixels: pass the CPLG mask as `mask` and the `valid` mask here). Every mask
  here means True = counts.

  Args:
    logits: `[B, H, W, C]`.
    labels: `[B, H, W]` int.
    mask: optional `[B, H, W]` bool/float selection (e.g. confidence mask), weights allowed.
    ignore_index: label value to skip.
    reduction: one of `REDUCTIONS`.
    normalizer_mask: optional `[B, H, W]` bool, the pixels that count in N (True = counts).
    axis_name: mapped axis for the global value inside `pmap`/`shard_map`.

  Returns:
    `(loss, aux)`; aux has `selected_ratio` (selected / N). Exactly 0 when nothing is selected.
  """
  if reduction not in REDUCTIONS:
    raise ValueError(f"reduction={reduction!r}; expected one of {REDUCTIONS}")
  nll = pixel_cross_entropy(logits, labels, ignore_index=ignore_index)
  selected = ops.valid_label_mask(labels, ignore_index).astype(jnp.float32)
  if mask is not None:
    selected = selected * jnp.asarray(mask, jnp.float32)
  total = jnp.ones_like(nll) if normalizer_mask is None else jnp.asarray(normalizer_mask,
                                                                          jnp.float32)
  num = collectives.global_sum(jnp.sum(selected * nll), axis_name)
  n_sel = lax.stop_gradient(collectives.global_sum(jnp.sum(selected), axis_name))
  n_all = lax.stop_gradient(collectives.global_sum(jnp.sum(total), axis_name))
  if reduction == "selected":
    loss = num / jnp.maximum(n_sel, 1.0)
  elif reduction == "all":
    loss = num / jnp.maximum(n_all, 1.0)
  else:
    loss = num * n_all / jnp.maximum(n_sel, 1.0) ** 2
  return loss, {"selected_ratio": n_sel / jnp.maximum(n_all, 1.0)}


@_deprecation.renamed_args({"thresh": "threshold"})
def ohem_cross_entropy_loss(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    threshold: float = 0.7,
    min_kept: int = 100_000,
    ignore_index: int = ops.IGNORE_INDEX,
    axis_name: Optional[str] = None,
) -> Tuple[jax.Array, dict]:
  """Online hard example mining CE (the Cityscapes loss of U2PL, DGCL, DSSN).

  A valid pixel is kept when its true-class probability p_i <= t, where
  t = max(threshold, p_(min_kept)) and p_(k) is the k-th smallest p over valid pixels; if there
  are at most `min_kept` valid pixels all are kept. The loss is the mean CE over kept pixels.

  `min_kept` counts pixels of the batch this call sees: the official recipes apply it per
  GPU, so a global batch of G GPUs' worth of images corresponds to `min_kept * G`.

  Args:
    logits: `[B, H, W, C]`.
    labels: `[B, H, W]` int.
    threshold: probability threshold (deprecated alias: `thresh`).
    min_kept: static minimum number of hardest pixels kept.
    ignore_index: label value to skip.
    axis_name: mapped axis (the kept set is then chosen over the global batch).

  Returns:
    `(loss, aux)`; aux has `selected_ratio` (kept / valid).
  """
  logits = jnp.asarray(logits, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  valid = ops.valid_label_mask(labels, ignore_index)
  prob = jnp.exp(-pixel_cross_entropy(logits, labels, ignore_index=ignore_index))
  flat_p = collectives.all_gather(lax.stop_gradient(prob).reshape(-1), axis_name,
                                  differentiable=False)
  flat_valid = collectives.all_gather(valid.reshape(-1), axis_name, differentiable=False)
  n_valid = jnp.sum(flat_valid)
  k = min(min_kept, flat_p.shape[0])
  if k > 0:
    kth, _, kth_valid = ops.masked_bottom_k(flat_p, flat_valid, k)
    kth_value = kth[-1]
    cut = jnp.where(kth_valid[-1] & (kth_value > threshold), kth_value, threshold)
  else:
    cut = jnp.asarray(threshold, jnp.float32)
  keep_all = n_valid <= min_kept
  kept = valid & (keep_all | (prob <= cut))
  loss, _ = cross_entropy_loss(logits, labels, kept, ignore_index=ignore_index,
                               axis_name=axis_name)
  n_kept = collectives.global_sum(jnp.sum(kept), axis_name)
  return loss, {"selected_ratio": n_kept / jnp.maximum(n_valid, 1)}
