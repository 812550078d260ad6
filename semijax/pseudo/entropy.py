"""Entropy-percentile pseudo-label filtering of DGCL (Wang et al., CVPR 2023, eqs. 4-6).

Pseudo-labels are the teacher's argmax (eq. 4). With per-pixel entropy H (eq. 5) and the
threshold eta = the (100 - beta_t)-th percentile of H over the valid pixels of the batch, a
pixel is kept iff it is valid and H < eta (eq. 6); beta_t decays linearly from beta_0 = 20.

Official code (`Gavinwxy/DGCL`, `train_semi.py`) facts reproduced here:
  * the threshold is `torch.quantile(H[valid], 1 - beta/100)` (linear interpolation, the same
    as `np.percentile`'s default) and pixels with H >= eta are dropped, so even at beta = 0 the
    maximum-entropy pixel(s) are dropped;
  * progress = (epoch - sup_only_epoch) / (epochs - sup_only_epoch), constant within an epoch
    (pass `steps_per_epoch`; without it progress is per step, the paper's t/T);
  * contrastive labels use a second, separate filter at feature resolution with
    alpha_t = max(80 (1 - progress), 10) percent dropped (not in the paper);
  * the percentile is over one GPU's batch there; here it is over the global batch (all
    devices with `axis_name`). Entropy is `semijax.ops.entropy` (exact 0 log 0 = 0; the code
    adds 1e-10 inside the log, a difference below 1e-9 nats).
"""

from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from semijax import collectives, ops


def _virtual_index(m: jax.Array, q: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """`(i, g)` with i + g = m * q / 100, i integer, g in [0, 1), without float64.

  m (int32, < 2^24) and q (float32) are split into 12-bit halves, so the four partial
  products are exact in float32; their integer parts are summed in int32 and only the sum of
  the four fractions and the final `/ 100` round (numpy computes m q / 100 in float64).
  """
  m_hi = (m & ~0xFFF).astype(jnp.float32)
  m_lo = (m & 0xFFF).astype(jnp.float32)
  q_hi = jax.lax.bitcast_convert_type(
      jax.lax.bitcast_convert_type(q, jnp.uint32) & jnp.uint32(0xFFFFF000), jnp.float32)
  q_lo = q - q_hi
  whole = jnp.int32(0)
  frac = jnp.float32(0)
  for p in (m_hi * q_hi, m_hi * q_lo, m_lo * q_hi, m_lo * q_lo):
    f = jnp.floor(p)
    whole = whole + f.astype(jnp.int32)
    frac = frac + (p - f)
  f = jnp.floor(frac)
  whole = whole + f.astype(jnp.int32)
  frac = frac - f
  i = whole // 100
  g = ((whole - 100 * i).astype(jnp.float32) + frac) / 100.0
  return i, g


def masked_percentile(x: jax.typing.ArrayLike, valid: jax.typing.ArrayLike,
                      q: jax.typing.ArrayLike, *,
                      axis_name: Optional[str] = None) -> jax.Array:
  """`np.percentile(x[valid], q)` with the default 'linear' method, static shapes.

  With the n valid values sorted ascending, s_0 <= ... <= s_{n-1}, h = (n - 1) q / 100,
  i = floor(h) and g = h - i, the result is numpy's `_lerp(s_i, s_{i+1}, g)`:
  `s_i + (s_{i+1} - s_i) g` if g < 0.5 else `s_{i+1} - (s_{i+1} - s_i)(1 - g)` (also what
  `torch.quantile` computes). One full sort of the (gathered) values. h is computed without
  float64 (x64 is off) to numpy's precision: i exactly and g within ~1e-7, for n < 2^24.

  Args:
    x: values, any shape.
    valid: bool, same shape.
    q: percentile in [0, 100] (scalar, may be traced).
    axis_name: mapped axis; the percentile is then over every device's valid values.

  Returns:
    Scalar float32; +inf when nothing is valid.
  """
  x = jnp.asarray(x, jnp.float32).reshape(-1)
  valid = jnp.asarray(valid, bool).reshape(-1)
  x = collectives.all_gather(x, axis_name, differentiable=False)
  valid = collectives.all_gather(valid, axis_name, differentiable=False)
  s = jnp.sort(jnp.where(valid, x, jnp.inf))
  n = jnp.sum(valid, dtype=jnp.int32)
  lo, g = _virtual_index(jnp.maximum(n - 1, 0), jnp.clip(jnp.asarray(q, jnp.float32), 0, 100))
  lo = jnp.clip(lo, 0, jnp.maximum(n - 1, 0))
  hi = jnp.minimum(lo + 1, jnp.maximum(n - 1, 0))
  a, b = s[lo], s[hi]
  diff = b - a
  value = jnp.where(g >= 0.5, b - diff * (1.0 - g), a + diff * g)
  return jnp.where(n > 0, value, jnp.inf)


def entropy_threshold(probs: jax.typing.ArrayLike, valid: jax.typing.ArrayLike, *,
                      drop_percent: jax.typing.ArrayLike,
                      axis_name: Optional[str] = None) -> jax.Array:
  """eta: the (100 - drop_percent)-th percentile of the valid pixels' entropy (eqs. 5-6).

  Args:
    probs: `[B, H, W, C]` teacher probabilities.
    valid: `[B, H, W]` bool (not padding / not ignored).
    drop_percent: beta_t in percent (may be traced).
    axis_name: mapped axis for a global percentile.

  Returns:
    Scalar float32 (+inf when nothing is valid).
  """
  ent = ops.entropy(probs)
  return masked_percentile(ent, valid, 100.0 - jnp.asarray(drop_percent, jnp.float32),
                           axis_name=axis_name)


def entropy_percentile_mask(probs: jax.typing.ArrayLike, valid: jax.typing.ArrayLike, *,
                            drop_percent: jax.typing.ArrayLike,
                            axis_name: Optional[str] = None) -> jax.Array:
  """Keeps valid pixels whose entropy is below the (100 - drop_percent)-th percentile (eq. 6).

  Drops the top `drop_percent` % highest-entropy pixels among the valid ones (H >= eta, the
  official rule; ties at eta are dropped). No gradient (a mask).

  Args:
    probs: `[B, H, W, C]` teacher probabilities.
    valid: `[B, H, W]` bool.
    drop_percent: beta_t in percent, e.g. `dgcl_drop_percent(step, ...)`.
    axis_name: mapped axis; the percentile is then over the global batch.

  Returns:
    `[B, H, W]` bool keep mask.
  """
  probs = jax.lax.stop_gradient(jnp.asarray(probs, jnp.float32))
  valid = jnp.asarray(valid, bool)
  eta = entropy_threshold(probs, valid, drop_percent=drop_percent, axis_name=axis_name)
  return valid & (ops.entropy(probs) < eta)


def filtered_pseudo_labels(probs: jax.typing.ArrayLike, valid: jax.typing.ArrayLike, *,
                           drop_percent: jax.typing.ArrayLike,
                           ignore_index: int = ops.IGNORE_INDEX,
                           axis_name: Optional[str] = None) -> Tuple[jax.Array, jax.Array, dict]:
  """Argmax pseudo-labels (eq. 4) with high-entropy and invalid pixels set to `ignore_index`.

  A pseudo-label rule like `semijax.pseudo.confidence_mask`: the mask is
  `entropy_percentile_mask` (eq. 6). Serves both DGCL label maps: L_unsup's (full
  resolution, `dgcl_drop_percent`) and the contrastive one (feature resolution, unlabeled
  part, `dgcl_contrastive_drop_percent`).

  Args:
    probs: `[B, H, W, C]` teacher probabilities.
    valid: `[B, H, W]` bool, True on real pixels.
    drop_percent: percent of valid pixels to drop (highest entropy).
    ignore_index: value for dropped pixels.
    axis_name: mapped axis for a global percentile (and global aux values).

  Returns:
    `(labels, mask, aux)`: `[B, H, W]` int32 (`ignore_index` where not kept), the kept
    pixels `[B, H, W]` bool, and aux with `selected_ratio` (kept / valid pixels) and
    `entropy_threshold` (eta; +inf when nothing is valid).
  """
  probs_f32 = jax.lax.stop_gradient(jnp.asarray(probs, jnp.float32))
  valid = jnp.asarray(valid, bool)
  eta = entropy_threshold(probs_f32, valid, drop_percent=drop_percent, axis_name=axis_name)
  keep = valid & (ops.entropy(probs_f32) < eta)
  labels = jnp.argmax(jnp.asarray(probs), axis=-1).astype(jnp.int32)
  kept = collectives.global_sum(jnp.sum(keep.astype(jnp.float32)), axis_name)
  n_valid = collectives.global_sum(jnp.sum(valid.astype(jnp.float32)), axis_name)
  aux = {"selected_ratio": kept / jnp.maximum(n_valid, 1.0), "entropy_threshold": eta}
  return jnp.where(keep, labels, ignore_index), keep, aux


def dgcl_progress(step: jax.typing.ArrayLike, *, start_step: int, total_steps: int,
                  steps_per_epoch: Optional[int] = None) -> jax.Array:
  """Training progress in [0, 1] after the supervised-only warm-up.

  Per step (paper, t/T with t counted from `start_step`): (step - start) / (total - start).
  With `steps_per_epoch` (official): (epoch - start_epoch) / (epochs - start_epoch) with
  epoch = step // steps_per_epoch, start_epoch = start_step // steps_per_epoch and
  epochs = total_steps // steps_per_epoch, so it is constant within an epoch and stays below 1
  during the last epoch, as in the official loop.

  Returns:
    Scalar float32, clipped to [0, 1].
  """
  step = jnp.asarray(step)
  if steps_per_epoch is None:
    num = (step - start_step).astype(jnp.float32)
    den = float(max(total_steps - start_step, 1))
  else:
    epoch = step // steps_per_epoch
    start_epoch = start_step // steps_per_epoch
    num = (epoch - start_epoch).astype(jnp.float32)
    den = float(max(total_steps // steps_per_epoch - start_epoch, 1))
  return jnp.clip(num / den, 0.0, 1.0)


def dgcl_drop_percent(step: jax.typing.ArrayLike, *, start_step: int, total_steps: int,
                      beta0: float = 20.0, steps_per_epoch: Optional[int] = None) -> jax.Array:
  """beta_t = beta0 (1 - progress): percent of high-entropy pixels dropped for L_unsup."""
  progress = dgcl_progress(step, start_step=start_step, total_steps=total_steps,
                           steps_per_epoch=steps_per_epoch)
  return beta0 * (1.0 - progress)


def dgcl_contrastive_drop_percent(step: jax.typing.ArrayLike, *, start_step: int,
                                  total_steps: int, alpha0: float = 80.0,
                                  alpha_min: float = 10.0,
                                  steps_per_epoch: Optional[int] = None) -> jax.Array:
  """alpha_t = max(alpha0 (1 - progress), alpha_min): official contrastive-label filter."""
  progress = dgcl_progress(step, start_step=start_step, total_steps=total_steps,
                           steps_per_epoch=steps_per_epoch)
  return jnp.maximum(alpha0 * (1.0 - progress), alpha_min)
