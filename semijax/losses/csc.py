"""CSC's contrastive losses (Consistency and Separation Regularization for Contrastive Learning in
Semi-supervised Semantic Segmentation, eqs. 5-6, Algorithm 1).

With unit features z, E(z_i, z_j) = exp(z_i . z_j / tau), queries (anchors) z_i, positives P_i
(same label, the query itself excluded) and negatives N_i (another label) in the contrast set:

  L_p = 1/n sum_i sum_{j in P_i}      -log E(i,j) / (E(i,j) + sum_{k in N_i} E(i,k))     (eq. 5)
  L_c = 1/n sum_i sum_{j in P_i^TopN} -log E(i,j) / (E(i,j) + sum_{k in N_i} E(i,k))     (eq. 6)

where P_i^TopN holds the N positives most similar to z_i (eq. 6b; N = 1 by default, so L_c
contrasts each query with its single closest positive). With N >= |P_i|, L_c is L_p. The
inner sum over positives is a sum in the paper and a mean in the code's all-positives path
(`positive_reduction`); for N = 1 they agree. n counts the queries with at least one
positive (a query without any contributes no term; the code's TopN path would use a fill
logit of -2/tau for it instead, a case its sampler never produces).

`csc_contrastive_loss` is CSC's whole query side: semi-hard queries per image and class
(`semijax.sampling.semihard`), the contrast set [queries ; bank], the fallback of Algorithm 1
while some class bank is empty, and the candidate code's filter that drops the unlabeled
queries with the lowest summed positive logits (`keep_fraction`, not in the paper).
"""

import math
from typing import NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from semijax import collectives, ops
from semijax.banks import csc as csc_bank, fifo
from semijax.sampling import semihard

REDUCTIONS = ("sum", "mean")
EMPTY_BANK = ("topn", "pixel")
_NO_NEGATIVE = -1e30   # log-sum-exp of an empty negative set (exp of it is exactly 0)


def _as_f32(x):
  return jnp.asarray(x, jnp.float32)


def l2_normalize(x: jax.typing.ArrayLike, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """`x / max(||x||, eps)` in float32 (PyTorch's `F.normalize` values), finite gradients.

  At a vector shorter than `eps` (an exactly zero representation: every ReLU before a zero
  bias off, which tiny models do produce) the gradient is 0; `sqrt` would give NaN there and
  PyTorch 1 / eps times the incoming gradient (1e12), which overflows the gradient norm.
  """
  x = _as_f32(x)
  sq = jnp.sum(x * x, axis=axis, keepdims=True)
  big = sq > eps * eps
  return jnp.where(big, x * lax.rsqrt(jnp.where(big, sq, 1.0)), lax.stop_gradient(x) / eps)


def _rows(a, alab, self_idx, k, klab, kvalid, *, top_n, temperature, positive_reduction):
  """The per-query losses of `contrastive_anchor_losses` for a block of (normalised) queries."""
  sim = jnp.einsum("ad,md->am", a, k)
  logits = sim / temperature
  same = alab[:, None] == klab[None, :]
  usable = jnp.broadcast_to(kvalid[None, :], logits.shape)
  is_self = jnp.arange(k.shape[0], dtype=jnp.int32)[None, :] == self_idx[:, None]
  pos = usable & same & ~is_self
  neg = usable & ~same
  # Log-sum-exp over the negatives with a detached shift; finite (zero) gradients if empty.
  has_neg = jnp.any(neg, axis=1)
  shift = lax.stop_gradient(jnp.max(jnp.where(neg, logits, -jnp.inf), axis=1))
  shift = jnp.where(has_neg, shift, 0.0)
  neg_sum = jnp.sum(jnp.where(neg, jnp.exp(jnp.where(neg, logits - shift[:, None], 0.0)), 0.0),
                    axis=1)
  neg_lse = jnp.where(has_neg, jnp.log(jnp.where(has_neg, neg_sum, 1.0)) + shift, _NO_NEGATIVE)
  extra = {}
  if top_n is None:
    sel = pos
    chosen = logits
    chosen_sim = sim
  else:
    n = min(top_n, k.shape[0])
    _, sel_idx, sel = ops.masked_top_k(lax.stop_gradient(logits), pos, n)
    chosen = jnp.take_along_axis(logits, sel_idx, axis=1)
    chosen_sim = jnp.take_along_axis(sim, sel_idx, axis=1)
    extra["positive_index"] = jnp.where(sel, sel_idx, 0)
    extra["positive_valid"] = sel
  chosen = jnp.where(sel, chosen, 0.0)
  # -log(E / (E + S)) = logaddexp(l, log S) - l
  per_pair = jnp.logaddexp(chosen, neg_lse[:, None]) - chosen
  num_sel = jnp.sum(sel, axis=1)
  total = jnp.sum(jnp.where(sel, per_pair, 0.0), axis=1)
  if positive_reduction == "mean":
    total = total / jnp.maximum(num_sel, 1).astype(jnp.float32)
  row_max = jnp.max(jnp.where(usable | is_self, logits, -jnp.inf), axis=1)
  extra.update(
      num_selected=num_sel, num_positives=jnp.sum(pos, axis=1),
      num_negatives=jnp.sum(neg, axis=1),
      positive_logit_sum=jnp.sum(jnp.where(pos, logits, 0.0), axis=1),
      row_max=jnp.where(jnp.isfinite(row_max), row_max, 0.0),
      pos_sim=jnp.sum(jnp.where(sel, chosen_sim, 0.0), axis=1) / jnp.maximum(num_sel, 1),
      neg_sim_sum=jnp.sum(jnp.where(neg, sim, 0.0), axis=1))
  return total, extra


def contrastive_anchor_losses(anchors: jax.typing.ArrayLike, anchor_labels: jax.typing.ArrayLike,
                              keys: jax.typing.ArrayLike, key_labels: jax.typing.ArrayLike,
                              key_valid: jax.typing.ArrayLike, *, top_n: Optional[int] = None,
                              temperature: float = 0.1, positive_reduction: str = "sum",
                              anchor_key_index: Optional[jax.typing.ArrayLike] = None,
                              ignore_index: int = ops.IGNORE_INDEX,
                              chunk_size: Optional[int] = None,
                              anchor_valid: Optional[jax.typing.ArrayLike] = None
                              ) -> Tuple[jax.Array, dict]:
  """Unreduced eqs. 5 (`top_n=None`) and 6: one loss per query.

  Args:
    anchors: `[A, D]` query features (normalised here; gradients flow).
    anchor_labels: `[A]` int.
    keys: `[M, D]` contrast set (normalised here; the caller stops gradients where wanted).
    key_labels: `[M]` int; `ignore_index` keys are neither positive nor negative.
    key_valid: `[M]` bool.
    top_n: N of eq. 6b, or None for every positive (eq. 5).
    temperature: tau.
    positive_reduction: 'sum' over the selected positives (paper) or 'mean' (code).
    anchor_key_index: optional `[A]` int, the column of `keys` that is the query itself
      (excluded from its positives), -1 for none.
    ignore_index: label of keys never used.
    chunk_size: compute the `[A, M]` similarities `chunk_size` queries at a time (a
      rematerialised `lax.map`: memory O(chunk_size M) instead of O(A M), same values), or
      None for all at once.
    anchor_valid: optional `[A]` bool; with `chunk_size`, a block without a valid query is
      skipped (its outputs are zeros), so put the valid queries first.

  Returns:
    `(loss, extra)`: `[A]` float32 per-query loss (0 for a query without positives) and a dict
    of `[A]` arrays: `num_selected` (positives used), `num_positives`, `num_negatives`,
    `positive_logit_sum` (sum of z_i.z_j/tau over all positives), `row_max` (largest logit
    over the valid keys), `pos_sim` (mean cosine of the selected positives), `neg_sim_sum`
    (sum of negative cosines); with `top_n`, also `positive_index` / `positive_valid`
    `[A, N]` (the selected keys, most similar first).
  """
  if positive_reduction not in REDUCTIONS:
    raise ValueError(f"positive_reduction={positive_reduction!r}; expected one of {REDUCTIONS}")
  if top_n is not None and top_n < 1:
    raise ValueError(f"top_n={top_n}; expected a positive int or None (all positives)")
  a = l2_normalize(anchors)
  k = l2_normalize(keys)
  num_a = a.shape[0]
  alab = jnp.asarray(anchor_labels, jnp.int32)
  klab = jnp.asarray(key_labels, jnp.int32)
  kvalid = jnp.asarray(key_valid, bool) & (klab != ignore_index)
  self_idx = (jnp.full((num_a,), -1, jnp.int32) if anchor_key_index is None
              else jnp.asarray(anchor_key_index, jnp.int32))
  kw = dict(top_n=top_n, temperature=temperature, positive_reduction=positive_reduction)
  if chunk_size is None or num_a <= chunk_size:
    return _rows(a, alab, self_idx, k, klab, kvalid, **kw)
  n = -(-num_a // chunk_size)
  pad = n * chunk_size - num_a
  blocks = (jnp.pad(a, ((0, pad), (0, 0))).reshape(n, chunk_size, -1),
            jnp.pad(alab, (0, pad), constant_values=ignore_index).reshape(n, chunk_size),
            jnp.pad(self_idx, (0, pad), constant_values=-1).reshape(n, chunk_size))
  rows = lambda xs: _rows(*xs[:3], k, klab, kvalid, **kw)  # noqa: E731
  if anchor_valid is None:
    block = rows
    any_valid = jnp.ones((n,), bool)
  else:
    any_valid = jnp.any(jnp.pad(jnp.asarray(anchor_valid, bool), (0, pad)).reshape(n, chunk_size),
                        axis=1)

    def block(xs):
      def skip(xs):
        shapes = jax.eval_shape(rows, xs)
        # Zeros typed like the computed branch (under shard_map, the same varying axes).
        zero = jnp.sum(xs[0][:1, :1]) * 0.0 + jnp.sum(k[:1, :1]) * 0.0
        return jax.tree.map(lambda t: jnp.zeros(t.shape, t.dtype) + zero.astype(t.dtype),
                            shapes)
      return lax.cond(xs[3], rows, skip, xs)
  out = lax.map(jax.checkpoint(block), blocks + (any_valid,))
  return jax.tree.map(lambda x: x.reshape((n * chunk_size,) + x.shape[2:])[:num_a], out)


def _gather_for_axis(anchors, anchor_labels, anchor_valid, keys, key_labels, key_valid,
                     anchor_key_index, axis_name):
  if axis_name is None:
    return anchors, anchor_labels, anchor_valid, keys, key_labels, key_valid, anchor_key_index
  m_local = jnp.asarray(keys).shape[0]
  if anchor_key_index is not None:
    idx = jnp.asarray(anchor_key_index, jnp.int32)
    anchor_key_index = jnp.where(idx >= 0, idx + lax.axis_index(axis_name) * m_local, -1)
    anchor_key_index = collectives.all_gather(anchor_key_index, axis_name, differentiable=False)
  gather = lambda x, d: collectives.all_gather(jnp.asarray(x), axis_name, differentiable=d)  # noqa: E731
  return (gather(_as_f32(anchors), True), gather(anchor_labels, False),
          gather(anchor_valid, False), gather(_as_f32(keys), True), gather(key_labels, False),
          gather(key_valid, False), anchor_key_index)


def topn_contrastive_loss(anchors: jax.typing.ArrayLike, anchor_labels: jax.typing.ArrayLike,
                          anchor_valid: jax.typing.ArrayLike, keys: jax.typing.ArrayLike,
                          key_labels: jax.typing.ArrayLike, key_valid: jax.typing.ArrayLike, *,
                          top_n: Optional[int] = 1, temperature: float = 0.1,
                          positive_reduction: str = "sum",
                          anchor_key_index: Optional[jax.typing.ArrayLike] = None,
                          ignore_index: int = ops.IGNORE_INDEX,
                          chunk_size: Optional[int] = None,
                          axis_name: Optional[str] = None) -> Tuple[jax.Array, dict]:
  """CSC's TopN InfoNCE L_c (eq. 6): each query against its N most similar positives.

  Example:
    >>> z = jnp.eye(3)
    >>> loss, aux = topn_contrastive_loss(z, jnp.array([0, 0, 1]), jnp.ones(3, bool), z,
    ...                                   jnp.array([0, 0, 1]), jnp.ones(3, bool),
    ...                                   anchor_key_index=jnp.arange(3))
    >>> float(aux['num_anchors'])   # the lone class-1 query has no positive
    2.0

  Args:
    anchors: `[A, D]` queries (gradients flow; normalised here).
    anchor_labels: `[A]` int.
    anchor_valid: `[A]` bool.
    keys: `[M, D]` contrast set (stop its gradient for bank entries).
    key_labels: `[M]` int.
    key_valid: `[M]` bool.
    top_n: N (1 in the paper's experiments); None = all positives (eq. 5, `pixel_contrastive_loss`).
    temperature: tau (candidate code: 0.1 Cityscapes, 0.2 VOC; not stated in the paper).
    positive_reduction: 'sum' (eqs. 5-6) or 'mean' over the selected positives.
    anchor_key_index: optional `[A]` column of `keys` that is the query itself (-1: none).
    ignore_index: label never used.
    chunk_size: queries per block of similarities (see `contrastive_anchor_losses`).
    axis_name: inside `pmap`/`shard_map`: anchors and keys (and `anchor_key_index`, local)
      are this device's shards; the loss is over the gathered sets, identical on every
      device, and each device's inputs receive their share of the gradient.

  Returns:
    `(loss, aux)`: scalar float32, the mean over valid queries with at least one positive
    (exactly 0 with zero gradients if there is none); aux `num_anchors`, `num_positives_mean`
    (per counted query, before TopN), `pos_sim_mean` (selected positives), `neg_sim_mean`.
  """
  (anchors, anchor_labels, anchor_valid, keys, key_labels, key_valid,
   anchor_key_index) = _gather_for_axis(anchors, anchor_labels, anchor_valid, keys, key_labels,
                                        key_valid, anchor_key_index, axis_name)
  per_anchor, extra = contrastive_anchor_losses(
      anchors, anchor_labels, keys, key_labels, key_valid, top_n=top_n,
      temperature=temperature, positive_reduction=positive_reduction,
      anchor_key_index=anchor_key_index, ignore_index=ignore_index, chunk_size=chunk_size,
      anchor_valid=anchor_valid)
  counted = (jnp.asarray(anchor_valid, bool) & (extra["num_selected"] > 0)
             & (jnp.asarray(anchor_labels) != ignore_index))
  return ops.masked_mean(per_anchor, counted), _loss_aux(counted, extra)


def pixel_contrastive_loss(anchors: jax.typing.ArrayLike, anchor_labels: jax.typing.ArrayLike,
                           anchor_valid: jax.typing.ArrayLike, keys: jax.typing.ArrayLike,
                           key_labels: jax.typing.ArrayLike, key_valid: jax.typing.ArrayLike, *,
                           temperature: float = 0.1, positive_reduction: str = "sum",
                           anchor_key_index: Optional[jax.typing.ArrayLike] = None,
                           ignore_index: int = ops.IGNORE_INDEX,
                           chunk_size: Optional[int] = None,
                           axis_name: Optional[str] = None) -> Tuple[jax.Array, dict]:
  """CSC's pixel-wise contrastive loss L_p (eq. 5): every positive of each query.

  `topn_contrastive_loss` with `top_n=None`; see there for the arguments and the result.
  """
  return topn_contrastive_loss(anchors, anchor_labels, anchor_valid, keys, key_labels,
                               key_valid, top_n=None, temperature=temperature,
                               positive_reduction=positive_reduction,
                               anchor_key_index=anchor_key_index, ignore_index=ignore_index,
                               chunk_size=chunk_size, axis_name=axis_name)


def _loss_aux(counted, extra) -> dict:
  c = counted.astype(jnp.float32)
  n = jnp.sum(c)
  nneg = jnp.sum(c * extra["num_negatives"])
  return {
      "num_anchors": n,
      "num_positives_mean": jnp.sum(c * extra["num_positives"]) / jnp.maximum(n, 1.0),
      "pos_sim_mean": lax.stop_gradient(jnp.sum(c * extra["pos_sim"]) / jnp.maximum(n, 1.0)),
      "neg_sim_mean": lax.stop_gradient(jnp.sum(c * extra["neg_sim_sum"])
                                        / jnp.maximum(nneg, 1.0)),
  }


def unlabeled_keep_fraction(step: jax.typing.ArrayLike, *, total_steps: int,
                            start_step: int = 0, start: float = 0.1, end: float = 0.9,
                            schedule: str = "log") -> jax.Array:
  """p_t of the candidate code's `UnlabelFilter` (not in the paper): the share of unlabeled
  queries kept, rising from `start` to `end` over training.

  With t = step - start_step and T = total_steps - start_step: 'log' (the code's default)
  p = start + (end - start) log(1 + t) / log(1 + T); 'exp' p = start (end / start)^(t / T);
  'linear' p = start + (end - start) t / T.

  Returns:
    Scalar float32 in [min(start, end), max(start, end)].
  """
  t = jnp.maximum(jnp.asarray(step, jnp.float32) - start_step, 0.0)
  big_t = float(max(total_steps - start_step, 1))
  t = jnp.minimum(t, big_t)
  if schedule == "log":
    p = start + (end - start) * jnp.log1p(t) / math.log1p(big_t)
  elif schedule == "exp":
    p = start * (end / start) ** (t / big_t)
  elif schedule == "linear":
    p = start + (end - start) * t / big_t
  else:
    raise ValueError(f"schedule={schedule!r}; expected 'log', 'exp' or 'linear'")
  return p.astype(jnp.float32)


class CSCSelection(NamedTuple):
  """The queries `csc_contrastive_loss` drew and used (a pytree; for the bank and diagnostics).

  Pixel indices point into the flat `[B h w]` pixels of the (global) batch; positive indices
  into the contrast set `[A queries ; C L bank slots]`.
  """
  pixel_index: jax.Array  # [A] int32
  valid: jax.Array  # [A] bool, drawn queries
  labels: jax.Array  # [A] int32
  hard: jax.Array  # [A] bool, labelled c but predicted otherwise
  counted: jax.Array  # [A] bool, queries whose loss is in the mean (after the filter)
  positive_index: jax.Array  # [A, N] int32, the TopN positives (zeros without TopN)
  positive_valid: jax.Array  # [A, N] bool
  features: jax.Array  # [A, D] float32 unit query features, no gradient


def csc_contrastive_loss(
    features: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    predictions: jax.typing.ArrayLike,
    bank: Optional[fifo.ClassBank],
    rng: jax.Array,
    *,
    views: Sequence[int],
    max_anchors: int = 2048,
    top_n: Optional[int] = 1,
    temperature: float = 0.1,
    positive_reduction: str = "mean",
    empty_bank: str = "topn",
    keep_fraction: Optional[jax.typing.ArrayLike] = None,
    detach_batch_keys: bool = False,
    valid: Optional[jax.typing.ArrayLike] = None,
    ignore_index: int = ops.IGNORE_INDEX,
    chunk_size: Optional[int] = 512,
    axis_name: Optional[str] = None,
) -> Tuple[jax.Array, dict]:
  """CSC's contrastive loss for one labeled or unlabeled batch (Sec. III-B/C, Algorithm 1).

  1. Queries: semi-hard sampling per image and class (`views` V_c per class, half hard /
     half easy against `predictions`); at most `max_anchors` in all (a uniform random subset
     of the drawn ones beyond that: a static cap, reported as `anchors_capped`).
  2. Contrast set: [the queries themselves (self excluded; gradients flow unless
     `detach_batch_keys`) ; every bank entry (no gradient)], as the candidate code.
  3. While some class bank is empty (or without a bank) the bank is left out; `empty_bank`
     picks the loss then: 'topn' keeps L_c on the batch (candidate code), 'pixel' uses L_p
     (Algorithm 1). With the bank, L_c (eq. 6) with `top_n` (None: all positives, L_p).
  4. With `keep_fraction` p (the code's `UnlabelFilter`, unlabeled call only), the
     ceil((1 - p) n) queries with the lowest summed positive logits (shifted by the row max,
     over all positives) are left out of the mean.

  Args:
    features: `[B, h, w, D]` features z (the student's representation; normalised here).
    labels: `[B, h, w]` int labels at feature resolution (ground truth, or pseudo-labels).
    predictions: `[B, h, w]` int student argmax (hard/easy split).
    bank: the CSC bank (`semijax.banks.csc`), or None for no bank.
    rng: PRNG key.
    views: V_c per class (`semijax.sampling.semihard.views_per_class`).
    max_anchors: static cap on the queries.
    top_n: N, or None for all positives.
    temperature: tau.
    positive_reduction: 'sum' (paper) or 'mean' (code) over a query's positives.
    empty_bank: 'topn' or 'pixel', see 3.
    keep_fraction: p in [0, 1] (may be traced), or None to keep every query.
    detach_batch_keys: stop gradients through the batch half of the contrast set.
    valid: optional `[B, h, w]` bool query candidates.
    ignore_index: label never used.
    chunk_size: queries per block of the `[A, A + C L]` similarities (memory; see
      `contrastive_anchor_losses`), None for one block.
    axis_name: inside `pmap`/`shard_map`: `features`, `labels`, `predictions` are this
      device's images; queries are drawn per image with global image indices and gathered,
      the cap and filter use device 0's key, so the value is the global batch's on every
      device and each device's features get their share of the gradient.

  Returns:
    `(loss, aux)`: scalar float32 (exactly 0 with zero gradients when nothing is drawn);
    aux scalars `num_anchors`, `num_hard_anchors`, `anchors_capped`, `anchors_filtered`,
    `num_counted`, `bank_used`, `num_positives_mean`, `pos_sim_mean`, `neg_sim_mean`,
    `positive_from_bank`, `keep_fraction`, plus `selection` (`CSCSelection`, not a
    scalar: pop it before logging).
  """
  if empty_bank not in EMPTY_BANK:
    raise ValueError(f"empty_bank={empty_bank!r}; expected one of {EMPTY_BANK}")
  features = jnp.asarray(features)
  b, h, w, d = features.shape
  c = len(views)
  if bank is not None and bank.num_classes != c:
    raise ValueError(f"views has {c} classes, the bank {bank.num_classes}")
  rng = collectives.same_rng(rng, axis_name)
  rng_sample, rng_cap = jax.random.split(rng)
  offset = 0 if axis_name is None else lax.axis_index(axis_name)
  image_ids = jnp.arange(b, dtype=jnp.int32) + offset * b
  sel, _ = semihard.sample(labels, predictions, rng_sample, views=views, valid=valid,
                           image_ids=image_ids, ignore_index=ignore_index)
  vmax = sel.index.shape[-1]
  flat = (jnp.arange(b, dtype=jnp.int32)[:, None, None] * (h * w) + sel.index).reshape(-1)
  local = jnp.take(features.reshape(b * h * w, d), flat, axis=0).astype(jnp.float32)
  slot_labels = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32)[None, :, None],
                                 (b, c, vmax)).reshape(-1)
  anchors = collectives.all_gather(local, axis_name, differentiable=True)
  gathered = lambda x: collectives.all_gather(x, axis_name, differentiable=False)  # noqa: E731
  a_valid = gathered(sel.valid.reshape(-1))
  a_labels = gathered(slot_labels)
  a_hard = gathered(sel.hard.reshape(-1))
  a_pixel = gathered(flat + offset * b * h * w)
  total = a_valid.shape[0]
  drawn = jnp.sum(a_valid.astype(jnp.float32))
  if total > max_anchors:
    pick, _ = ops.random_subset(rng_cap, a_valid, max_anchors)
  else:   # the drawn queries first, in order (blocks without any are skipped)
    pick = jnp.argsort(~a_valid, stable=True).astype(jnp.int32)
  if total > max_anchors or chunk_size is not None:
    anchors = jnp.take(anchors, pick, axis=0)
    a_valid, a_labels, a_hard, a_pixel = (jnp.take(x, pick, axis=0)
                                          for x in (a_valid, a_labels, a_hard, a_pixel))
  num_a = a_valid.shape[0]
  capped = drawn - jnp.sum(a_valid.astype(jnp.float32))

  batch_keys = lax.stop_gradient(anchors) if detach_batch_keys else anchors
  if bank is not None:
    bank_feats, bank_labels, bank_valid = csc_bank.contents(bank)
    bank_used = csc_bank.is_complete(bank)
    keys = jnp.concatenate([batch_keys, bank_feats.astype(jnp.float32)])
    key_labels = jnp.concatenate([a_labels, bank_labels])
    key_valid = jnp.concatenate([a_valid, bank_valid & bank_used])
  else:
    bank_used = jnp.zeros((), bool)
    keys, key_labels, key_valid = batch_keys, a_labels, a_valid
  self_index = jnp.arange(num_a, dtype=jnp.int32)
  kw = dict(temperature=temperature, positive_reduction=positive_reduction,
            anchor_key_index=self_index, ignore_index=ignore_index, chunk_size=chunk_size,
            anchor_valid=a_valid)

  def losses(n):
    return contrastive_anchor_losses(anchors, a_labels, keys, key_labels, key_valid, top_n=n,
                                     **kw)

  if top_n is None:
    per_anchor, extra = losses(None)
  elif empty_bank == "topn" or bank is None:
    per_anchor, extra = losses(top_n)
  else:   # Algorithm 1: L_p while some class bank is empty, L_c after.
    def pixel_branch():
      out, ex = losses(None)
      n = min(top_n, keys.shape[0])
      ex["positive_index"] = jnp.zeros((num_a, n), jnp.int32)
      ex["positive_valid"] = jnp.zeros((num_a, n), bool)
      return out, ex
    per_anchor, extra = lax.cond(bank_used, lambda: losses(top_n), pixel_branch)

  kept = a_valid
  filtered = jnp.zeros((), jnp.float32)
  if keep_fraction is not None:
    p = jnp.clip(_as_f32(keep_fraction), 0.0, 1.0)
    score = lax.stop_gradient(extra["positive_logit_sum"]
                              - extra["num_positives"] * extra["row_max"])
    n_valid = jnp.sum(a_valid.astype(jnp.int32))
    n_drop = jnp.ceil((1.0 - p) * n_valid.astype(jnp.float32)).astype(jnp.int32)
    order = jnp.argsort(jnp.where(a_valid, score, jnp.inf), stable=True)
    rank = jnp.zeros((num_a,), jnp.int32).at[order].set(jnp.arange(num_a, dtype=jnp.int32))
    kept = a_valid & (rank >= n_drop)
    filtered = jnp.sum((a_valid & ~kept).astype(jnp.float32))
  counted = kept & (extra["num_selected"] > 0)
  loss = ops.masked_mean(per_anchor, counted)

  aux = _loss_aux(counted, extra)
  aux["num_counted"] = aux.pop("num_anchors")
  if "positive_valid" in extra:
    pv = extra["positive_valid"] & counted[:, None]
    from_bank = jnp.sum((pv & (extra["positive_index"] >= num_a)).astype(jnp.float32))
    aux["positive_from_bank"] = from_bank / jnp.maximum(jnp.sum(pv.astype(jnp.float32)), 1.0)
    pos_index, pos_valid = extra["positive_index"], extra["positive_valid"]
  else:
    aux["positive_from_bank"] = jnp.zeros((), jnp.float32)
    pos_index = jnp.zeros((num_a, 1), jnp.int32)
    pos_valid = jnp.zeros((num_a, 1), bool)
  aux.update(
      num_anchors=jnp.sum(a_valid.astype(jnp.float32)),
      num_hard_anchors=jnp.sum((a_hard & a_valid).astype(jnp.float32)),
      anchors_capped=capped, anchors_filtered=filtered,
      bank_used=bank_used.astype(jnp.float32),
      keep_fraction=(jnp.ones((), jnp.float32) if keep_fraction is None
                     else jnp.clip(_as_f32(keep_fraction), 0.0, 1.0)))
  aux["selection"] = CSCSelection(
      pixel_index=a_pixel, valid=a_valid, labels=a_labels, hard=a_hard & a_valid,
      counted=counted, positive_index=pos_index, positive_valid=pos_valid,
      features=lax.stop_gradient(l2_normalize(anchors)))
  return loss, aux
