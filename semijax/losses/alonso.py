"""Losses of Alonso et al. (ICCV 2021), "Semi-supervised semantic segmentation with pixel-level
contrastive learning from a class-wise memory bank".

* `attention_weights` (eq. 8): the learned per-feature weights S_c(.) L1-normalised to mean 1
  over the features of each class.
* `class_contrastive_loss` (eqs. 9-11): the weighted cosine distance between the student's
  prediction vectors p_c and the memory-bank entries z'_c of the same class,

      D(p, z)  = w_p w_z (1 - <p, z> / (||p|| ||z||))                       (eqs. 9-10)
      L_contr  = 1/C  sum_c  1/|P_c| 1/|Z'_c|  sum_{p in P_c} sum_{z in Z'_c} D(p, z)   (eq. 11)

  computed without the |P_c| x |Z'_c| matrix: since the memory weights average to 1,
  sum_z w_z (1 - cos(p, z)) = |Z'_c| (1 - <p / ||p||, m_c>) with m_c the weighted mean of the
  normalised entries, so a class costs O((|P_c| + |Z'_c|) D).
* `entropy_loss` (eq. 7): direct entropy minimisation on the student's predictions.
* `class_balance_weights` (eq. 3's alpha_c = sqrt(f_m / f_c)) and the frequency window the
  official code draws f_c from (`FrequencyWindow`, `frequency_window_update`).

Every function is pure, static-shape and takes `axis_name` (the `semijax.collectives` contract).
"""

import dataclasses
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from semijax import collectives, ops

CLASS_REDUCTIONS = ("present", "all")


def _replicated_share(x: jax.Array, axis_name: Optional[str]) -> jax.Array:
  """`x` in value; 1/D of its gradient on each of D devices.

  For a value every device computes identically from replicated inputs (the bank): each
  device's gradient is then its share, and the shares sum (shard_map, or `psum` under pmap)
  to the gradient of the global value (BUILD_NOTES, `axis_name` contract).
  """
  if axis_name is None:
    return x
  n = collectives.axis_size(axis_name)
  return x / n + lax.stop_gradient(x - x / n)


def attention_weights(scores: jax.typing.ArrayLike, groups: jax.typing.ArrayLike,
                      valid: jax.typing.ArrayLike, *, num_groups: int
                      ) -> Tuple[jax.Array, jax.Array]:
  """Eq. 8: w_i = |P_c| S_c(x_i) / sum_{k in P_c} S_c(x_k) for the items i of group c.

  Following [35] (Sun et al.) the weights of a group are L1-normalised to mean 1, so that they
  cannot all shrink to 0. Gradients flow into every score of the group (through the sum).

  Args:
    scores: `[N]` attention outputs in (0, 1) (after the sigmoid).
    groups: `[N]` int class of each item.
    valid: `[N]` bool; invalid items get weight 0 and do not count.
    num_groups: C (static).

  Returns:
    `(weights [N] float32, counts [C] float32)`: 0 where invalid; `counts` = |P_c|.
  """
  scores = jnp.asarray(scores, jnp.float32)
  groups = jnp.asarray(groups, jnp.int32)
  valid = jnp.asarray(valid, bool) & (groups >= 0) & (groups < num_groups)
  g = jnp.where(valid, groups, num_groups).astype(jnp.int32)
  counts = jax.ops.segment_sum(valid.astype(jnp.float32), g, num_segments=num_groups + 1)
  sums = jax.ops.segment_sum(jnp.where(valid, scores, 0.0), g, num_segments=num_groups + 1)
  safe = jnp.where(valid, sums[g], 1.0)
  weights = jnp.where(valid, counts[g] * scores / jnp.maximum(safe, 1e-12), 0.0)
  return weights, counts[:num_groups]


def bank_weights(bank_scores: jax.typing.ArrayLike, bank_valid: jax.typing.ArrayLike
                 ) -> jax.Array:
  """Eq. 8 for the memory entries z'_c: `[C, K]` scores -> `[C, K]` weights (mean 1 per class).

  Invalid slots get 0. (The official code normalises along a size-1 axis, so its memory
  weights are identically 1: BUILD_NOTES, Alonso.)
  """
  s = jnp.asarray(bank_scores, jnp.float32)
  v = jnp.asarray(bank_valid, bool)
  n = jnp.sum(v, axis=1, keepdims=True).astype(jnp.float32)
  total = jnp.sum(jnp.where(v, s, 0.0), axis=1, keepdims=True)
  return jnp.where(v, n * s / jnp.maximum(total, 1e-12), 0.0)


def class_contrastive_loss(
    predictions: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    bank_entries: jax.typing.ArrayLike,
    bank_valid: jax.typing.ArrayLike,
    prediction_scores: Optional[jax.typing.ArrayLike] = None,
    bank_scores: Optional[jax.typing.ArrayLike] = None,
    *,
    valid: Optional[jax.typing.ArrayLike] = None,
    class_reduction: str = "present",
    min_predictions: int = 2,
    min_bank: int = 2,
    ignore_index: int = ops.IGNORE_INDEX,
    axis_name: Optional[str] = None,
) -> Tuple[jax.Array, dict]:
  """Alonso et al.'s class-wise memory-bank contrastive loss, eqs. 8-11.

  For every class c with at least `min_predictions` prediction vectors P_c and at least
  `min_bank` memory entries Z'_c (the official code's `> 1` gate),

    L_c = 1/(|P_c| |Z'_c|) sum_{p in P_c} sum_{z in Z'_c} w_p w_z (1 - cos(p, z))

  with w from eq. 8 (`attention_weights`; all 1 when the scores are None), and
  L = sum_c L_c / #classes that qualify (`class_reduction='present'`, the paper's
  "averaged over the classes") or / C (`'all'`, the official code). Memory entries are
  constants (`stop_gradient`); gradients reach the predictions and both sets of scores.

  Example:
    >>> loss, aux = class_contrastive_loss(p, y, *fifo.read(bank), s_p, s_z)  # doctest: +SKIP

  Args:
    predictions: `[..., D]` student prediction vectors q(g(f(x))) (any float dtype).
    labels: `[...]` int class of each vector (ground truth or pseudo-label).
    bank_entries: `[C, K, D]` memory (teacher projections), no gradient.
    bank_valid: `[C, K]` bool.
    prediction_scores: optional `[...]` S_c(p) in (0, 1) of each vector's own class.
    bank_scores: optional `[C, K]` S^mem_c(z) in (0, 1).
    valid: optional `[...]` bool, vectors that may count (e.g. not padding).
    class_reduction: 'present' or 'all' (see above).
    min_predictions: a class needs this many vectors (official 2).
    min_bank: and this many memory entries (official 2).
    ignore_index: label that never counts.
    axis_name: inside `pmap`/`shard_map`: the global loss over every device's vectors; each
      device's predictions and prediction scores get their share of its gradient, and the
      (replicated) bank scores 1/D of theirs.

  Returns:
    `(loss, aux)`: float32 scalar (exactly 0 with zero gradients when no class qualifies) and
    a dict of scalars (`num_classes`, `num_predictions`, `cos_mean`, `prediction_weight_std`,
    `bank_weight_std`) plus `selection`: `{'valid': [N] bool, 'weight': [N]}` for the
    vectors of this device (flattened), which the caller pops before logging.
  """
  if class_reduction not in CLASS_REDUCTIONS:
    raise ValueError(f"class_reduction={class_reduction!r}; expected one of {CLASS_REDUCTIONS}")
  predictions = jnp.asarray(predictions)
  dim = predictions.shape[-1]
  bank = lax.stop_gradient(jnp.asarray(bank_entries, jnp.float32))
  num_classes = bank.shape[0]
  if bank.shape[-1] != dim:
    raise ValueError(f"predictions have dimension {dim} but the bank {bank.shape[-1]}")
  p = predictions.reshape(-1, dim).astype(jnp.float32)
  y = jnp.asarray(labels).reshape(-1).astype(jnp.int32)
  v = y != ignore_index
  if valid is not None:
    v = v & jnp.asarray(valid, bool).reshape(-1)
  v = v & (y >= 0) & (y < num_classes)
  n_local = p.shape[0]
  s = (jnp.ones((n_local,), jnp.float32) if prediction_scores is None
       else jnp.asarray(prediction_scores, jnp.float32).reshape(-1))
  # Global vectors: every device evaluates the global loss, gradients reach its own rows.
  p = collectives.all_gather(p, axis_name)
  s = collectives.all_gather(s, axis_name)
  y = collectives.all_gather(y, axis_name, differentiable=False)
  v = collectives.all_gather(v, axis_name, differentiable=False)

  w_p, counts = attention_weights(s, y, v, num_groups=num_classes)
  bv = jnp.asarray(bank_valid, bool)
  n_bank = jnp.sum(bv, axis=1).astype(jnp.float32)
  if bank_scores is None:
    w_z = bv.astype(jnp.float32)
  else:
    w_z = _replicated_share(bank_weights(bank_scores, bv), axis_name)
  z_hat = ops.l2_normalize(bank)
  # m_c = 1/|Z'_c| sum_z w_z z / ||z||: eq. 11's inner sum is |Z'_c| (1 - <p_hat, m_c>).
  centre = jnp.einsum("ck,ckd->cd", w_z, z_hat) / jnp.maximum(n_bank, 1.0)[:, None]
  active = (counts >= min_predictions) & (n_bank >= min_bank)  # [C]
  g = jnp.where(v, y, 0)
  use = v & active[g]
  p_hat = ops.l2_normalize(p)
  cos = jnp.sum(p_hat * centre[g], axis=-1)
  per_vector = jnp.where(use, w_p * (1.0 - cos), 0.0)
  g_use = jnp.where(use, y, num_classes)
  class_sum = jax.ops.segment_sum(per_vector, g_use, num_segments=num_classes + 1)[:num_classes]
  per_class = class_sum / jnp.maximum(counts, 1.0)
  n_active = jnp.sum(active).astype(jnp.float32)
  denom = n_active if class_reduction == "present" else float(num_classes)
  loss = jnp.sum(jnp.where(active, per_class, 0.0)) / jnp.maximum(denom, 1.0)

  f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
  n_use = jnp.sum(f32(use))
  sg = lax.stop_gradient
  wz_valid = bv & active[:, None]
  aux = {
      "num_classes": n_active,
      "num_predictions": n_use,
      # Unweighted mean cosine between a vector and its class's memory (1 = collapsed on it).
      "cos_mean": sg(jnp.sum(jnp.where(use, cos, 0.0)) / jnp.maximum(n_use, 1.0)),
      "prediction_weight_std": sg(_masked_std(w_p, use)),
      "bank_weight_std": sg(_masked_std(w_z, wz_valid)),
      "selection": {"valid": collectives.local_rows(use, axis_name),
                    "weight": sg(collectives.local_rows(w_p, axis_name))},
  }
  return loss, aux


def _masked_std(x: jax.Array, mask: jax.Array) -> jax.Array:
  m = mask.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(m), 1.0)
  mean = jnp.sum(x * m) / n
  return jnp.sqrt(jnp.sum(m * (x - mean) ** 2) / n)


def entropy_loss(logits: jax.typing.ArrayLike, mask: Optional[jax.typing.ArrayLike] = None, *,
                 normalize: bool = True, axis_name: Optional[str] = None
                 ) -> Tuple[jax.Array, dict]:
  """Direct entropy minimisation, eq. 7: mean over pixels of -sum_c p_c log p_c.

  With `normalize` the entropy is divided by log C (the official code: base-2 entropy over
  log2 C, i.e. in [0, 1]); without it, it is in nats as eq. 7 is written. Averaged over the
  pixels of `mask` (official: those whose pseudo-label is not ignore, i.e. not padding)
  or over all pixels (eq. 7: N pixels).

  Args:
    logits: `[B, H, W, C]` student logits (any float dtype); a stack of the A views.
    mask: optional `[B, H, W]` bool/float pixels that count.
    normalize: divide by log C.
    axis_name: mapped axis for the global mean.

  Returns:
    `(loss, aux)`: float32 scalar (0 with zero gradients when the mask is empty) and
    `{'entropy_mean': ...}` (the same value, detached).
  """
  logits = jnp.asarray(logits, jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
  if normalize:
    ent = ent / math.log(logits.shape[-1])
  mask = jnp.ones(ent.shape, jnp.float32) if mask is None else mask
  loss = ops.masked_mean(ent, mask, axis_name=axis_name)
  return loss, {"entropy_mean": lax.stop_gradient(loss)}


# ---------------------------------------------------------------------------------------------
# Class balancing (eq. 3's alpha_c; official `utils/class_balancing.py`).


def class_balance_weights(frequencies: jax.typing.ArrayLike, *, power: float = 0.5) -> jax.Array:
  """alpha_c = (f_m / f_c)^power with f_m the median of all class frequencies (eq. 3: 1/2).

  A class never seen (f_c = 0) gets the largest weight, as the official code does (its
  infinite ratio is first set to 1, then to the maximum weight).

  Args:
    frequencies: `[C]` pixel counts (or frequencies) per class.
    power: 0.5 (square root, the paper).

  Returns:
    `[C]` float32 weights.
  """
  f = jnp.asarray(frequencies, jnp.float32)
  median = jnp.median(f)
  seen = f > 0
  ratio = jnp.where(seen, median / jnp.where(seen, f, 1.0), 1.0)
  ratio = jnp.where(seen, ratio, jnp.max(ratio))
  return ratio ** power


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FrequencyWindow:
  """Per-class pixel counts of recent steps: official `ClassBalancing` (a pytree).

  Attributes:
    labeled: `[L, C]` float32 counts of the ground truth of the first L steps (one pass over
      the labeled set, `N_l / B_l` steps in the official code; never replaced).
    unlabeled: `[U, C]` float32 counts of the pseudo-labels of the last U steps (a ring;
      `N_u / B_u` steps officially).
    step: int32 scalar, updates so far.
  """
  labeled: jax.Array  # [L, C] float32
  unlabeled: jax.Array  # [U, C] float32
  step: jax.Array  # [] int32


def frequency_window_init(num_classes: int, labeled_rows: int, unlabeled_rows: int
                          ) -> FrequencyWindow:
  """An empty window (`labeled_rows`, `unlabeled_rows` >= 1)."""
  if labeled_rows < 1 or unlabeled_rows < 1:
    raise ValueError(f"window rows must be >= 1, got labeled_rows={labeled_rows}, "
                     f"unlabeled_rows={unlabeled_rows}")
  return FrequencyWindow(labeled=jnp.zeros((labeled_rows, num_classes), jnp.float32),
                         unlabeled=jnp.zeros((unlabeled_rows, num_classes), jnp.float32),
                         step=jnp.zeros((), jnp.int32))


def class_counts(labels: jax.typing.ArrayLike, num_classes: int, *,
                 axis_name: Optional[str] = None) -> jax.Array:
  """`[C]` float32 pixel count of each class in `labels` (other values skipped), global."""
  y = jnp.asarray(labels).reshape(-1).astype(jnp.int32)
  ok = (y >= 0) & (y < num_classes)
  counts = jax.ops.segment_sum(ok.astype(jnp.float32), jnp.where(ok, y, num_classes),
                               num_segments=num_classes + 1)[:num_classes]
  if axis_name is not None:
    counts = lax.psum(counts, axis_name)
  return counts


def frequency_window_update(window: FrequencyWindow, labels: jax.typing.ArrayLike,
                            pseudo_labels: jax.typing.ArrayLike, *,
                            axis_name: Optional[str] = None) -> FrequencyWindow:
  """Adds one step's ground truth (while the labeled rows last) and pseudo-labels (ring)."""
  c = window.labeled.shape[1]
  n_l, n_u = window.labeled.shape[0], window.unlabeled.shape[0]
  t = window.step
  lab = class_counts(labels, c, axis_name=axis_name)
  unl = class_counts(pseudo_labels, c, axis_name=axis_name)
  labeled = window.labeled.at[jnp.where(t < n_l, t, n_l)].set(lab, mode="drop")
  unlabeled = window.unlabeled.at[t % n_u].set(unl)
  return FrequencyWindow(labeled=labeled, unlabeled=unlabeled, step=t + 1)


def frequency_window_weights(window: FrequencyWindow, *, power: float = 0.5) -> jax.Array:
  """`class_balance_weights` of the window's summed counts; all 1 until both parts are full."""
  n_l, n_u = window.labeled.shape[0], window.unlabeled.shape[0]
  freqs = jnp.sum(window.labeled, 0) + jnp.sum(window.unlabeled, 0)
  ready = window.step >= max(n_l, n_u)
  return jnp.where(ready, class_balance_weights(freqs, power=power),
                   jnp.ones_like(freqs))
