"""Directional contrastive loss of CAC (Lai et al., CVPR 2021, eqs. 1-8), with negatives at scale.

For a pair i of features of the same pixel seen in two contexts (overlapping crops), phi_1i and
phi_2i (L2-normalised), classifier confidences c_1i, c_2i and pseudo-labels y_1i, y_2i, and a
negative set F with pseudo-labels y_n:

  s(a, b)  = <a, b> / tau
  l_1i     = -log  exp(s(phi_1i, sg(phi_2i))) /
                   (exp(s(phi_1i, sg(phi_2i))) + sum_{n in F, y_n != y_1i} exp(s(phi_1i, phi_n)))
  M_1i     = [c_2i > gamma] and [c_1i < c_2i]              (eqs. 2 and 7; strict, as the code)
  L_1      = sum_i M_1i l_1i / sum_i M_1i                  (official: over the selected pairs)
  L_dc     = L_1 + L_2                                      (eq. 3; L_2 with the views swapped)

so the gradient of l_1i reaches only the less confident feature phi_1i (the target is
stop-gradient) and only when the more confident side is confident enough. The paper normalises
per image, L_1 = (1/B) sum_b (1/N_b) sum_{i in b} M_1i l_1i with N_b the image's overlap pixels
(eqs. 1 and 8; `reduction='per_image'`); the official code divides by the number of selected
pairs of the whole (per-GPU) batch (`reduction='selected'`, the default; over the global batch).

Negatives never carry gradients (the official code gathers them under `no_grad`). Their number
is the cost driver (Table 4: up to 25.6k per GPU), so the denominator is a streaming
log-sum-exp over fixed-size chunks of F inside a `lax.scan` whose body is `jax.checkpoint`ed:
the backward pass recomputes each chunk's `[N, chunk]` logits instead of storing `[N, |F|]`, so
memory grows with N x chunk, not with N x |F| (the official code uses `torch.utils.checkpoint`
on chunks of 8000). Since a pair teaches at most one side under the directional mask, the loss
runs one anchor row per pair (half of both directions over every pair). The log-sum-exp is exact;
the official code subtracts the max of the positive and the first chunk and adds `1e-8` twice (in
the ratio and in the log), which changes the value by < 1e-6 relative unless every term is ~1e-8
of that max.

Switches for the paper's Table 3 ablations: `directional=False` (vanilla contrastive loss: both
sides receive gradients, no confidence direction), `threshold=0` (no positive filtering),
`negative_sampling=False` (every negative, whatever its pseudo-label).
"""

from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from semijax import collectives, ops

REDUCTIONS = ("selected", "per_image")


def chunking(num: int, chunk_size: int) -> Tuple[int, int]:
  """`(num_chunks, chunk)`: the fewest chunks of at most `chunk_size`, as even as possible
  (padding below one entry per chunk)."""
  if num <= 0:
    return 1, 1
  num_chunks = -(-num // max(1, int(chunk_size)))
  return num_chunks, -(-num // num_chunks)


def _label_aggregates(anchors, anchor_labels, negatives, negative_labels, negative_valid):
  """Per anchor: the number of valid negatives with its label and the sum of its cosines to
  them, from negatives sorted by label (O(M log M + M D); no `[N, M]` array)."""
  sentinel = jnp.iinfo(jnp.int32).min
  labels = jnp.where(negative_valid, negative_labels, sentinel)
  order = jnp.argsort(labels)
  labels = labels[order]
  feats = jnp.where(negative_valid[:, None], negatives, 0.0)[order]
  cum = jnp.concatenate([jnp.zeros((1, feats.shape[1]), jnp.float32), jnp.cumsum(feats, 0)])
  lo = jnp.searchsorted(labels, anchor_labels, side="left")
  hi = jnp.searchsorted(labels, anchor_labels, side="right")
  same_count = (hi - lo).astype(jnp.float32)
  same_sum = jnp.sum(anchors * (cum[hi] - cum[lo]), axis=-1)
  return same_count, same_sum


def negative_log_sum_exp(anchors: jax.typing.ArrayLike, positive_logits: jax.typing.ArrayLike,
                         anchor_labels: jax.typing.ArrayLike, negatives: jax.typing.ArrayLike,
                         negative_labels: jax.typing.ArrayLike,
                         negative_valid: jax.typing.ArrayLike, *, temperature: float = 0.1,
                         negative_sampling: bool = True, chunk_size: int = 8000,
                         compute_dtype: Optional[jnp.dtype] = None
                         ) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """`log(exp(pos) + sum_{valid n, y_n != y_a} exp(<a, n> / tau))` per anchor, in chunks.

  The sum runs over chunks of negatives in a `lax.scan` whose body is rematerialised
  (`jax.checkpoint`): the backward pass recomputes a chunk's `[N, chunk]` similarities instead
  of keeping `[N, M]`. Anchors and negatives are unit vectors, so every logit lies in
  `[-1/tau, 1/tau]` and the sum is shifted by the constant `1/tau` (no running max) unless
  `2/tau` could underflow float32 (tau < 0.035), where a running max is kept.

  Args:
    anchors: `[N, D]` unit anchors (gradients flow).
    positive_logits: `[N]` the positive's logit `<a, p> / tau` (gradients flow as given).
    anchor_labels: `[N]` int pseudo-labels of the anchors.
    negatives: `[M, D]` unit negatives (treated as constants).
    negative_labels: `[M]` int.
    negative_valid: `[M]` bool.
    temperature: tau.
    negative_sampling: drop negatives sharing the anchor's pseudo-label (eq. 5).
    chunk_size: at most this many negatives per chunk (`chunking`). Peak memory of the loss
      and its gradient is O(N x chunk).
    compute_dtype: dtype of the similarity matmul (default float32; bfloat16 on accelerators).

  Returns:
    `(lse [N], neg_sim_sum [N], neg_count [N])`: the log-denominator, and the sum and number of
    the anchor-negative cosines that entered it (diagnostics, no gradient).
  """
  anchors = jnp.asarray(anchors, jnp.float32)
  pos = jnp.asarray(positive_logits, jnp.float32)
  a_lab = jnp.asarray(anchor_labels, jnp.int32)
  neg = lax.stop_gradient(jnp.asarray(negatives, jnp.float32))
  n_lab = jnp.asarray(negative_labels, jnp.int32)
  n_val = jnp.asarray(negative_valid, bool)
  m = neg.shape[0]
  num_chunks, chunk = chunking(m, chunk_size)
  extra = num_chunks * chunk - m
  chunks = (jnp.pad(neg, ((0, extra), (0, 0))).reshape(num_chunks, chunk, -1),
            jnp.pad(n_lab, (0, extra)).reshape(num_chunks, chunk),
            jnp.pad(n_val, (0, extra)).reshape(num_chunks, chunk))
  dtype = compute_dtype or jnp.float32
  inv_tau = 1.0 / temperature
  fixed_shift = 2.0 * inv_tau <= 70.0   # exp(-70) ~ 4e-31: no underflow to 0 in float32

  def masked_logits(feats, labels, valid):
    sims = jnp.einsum("nd,kd->nk", anchors.astype(dtype), feats.astype(dtype),
                      preferred_element_type=jnp.float32)
    take = valid[None, :]
    if negative_sampling:
      take = take & (labels[None, :] != a_lab[:, None])
    return sims * inv_tau, take

  if fixed_shift:
    @jax.checkpoint
    def body(run_sum, xs):
      logits, take = masked_logits(*xs)
      return run_sum + jnp.sum(jnp.where(take, jnp.exp(logits - inv_tau), 0.0), axis=1), None

    # The positive starts the sum.
    run_sum, _ = lax.scan(body, jnp.exp(pos - inv_tau), chunks)
    lse = inv_tau + jnp.log(run_sum)
  else:
    @jax.checkpoint
    def body(carry, xs):
      run_max, run_sum = carry
      logits, take = masked_logits(*xs)
      logits = jnp.where(take, logits, -jnp.inf)
      # The shift cancels in the value; stopping its gradient keeps the weights exact.
      new_max = lax.stop_gradient(jnp.maximum(run_max, jnp.max(logits, axis=1)))
      run_sum = run_sum * jnp.exp(run_max - new_max) + jnp.sum(
          jnp.exp(logits - new_max[:, None]), axis=1)
      return (new_max, run_sum), None

    start = lax.stop_gradient(pos)
    (run_max, run_sum), _ = lax.scan(body, (start, jnp.exp(pos - start)), chunks)
    lse = run_max + jnp.log(run_sum)

  # Diagnostics without another pass over [N, M]: all valid negatives minus the same-label ones.
  a = lax.stop_gradient(anchors)
  valid_f = n_val.astype(jnp.float32)
  count = jnp.broadcast_to(jnp.sum(valid_f), pos.shape)
  sim_sum = a @ jnp.sum(neg * valid_f[:, None], axis=0)
  if negative_sampling:
    same_count, same_sum = _label_aggregates(a, a_lab, neg, n_lab, n_val)
    count, sim_sum = count - same_count, sim_sum - same_sum
  return lse, sim_sum, count


def directional_pair_losses(
    anchors: jax.typing.ArrayLike, targets: jax.typing.ArrayLike,
    anchor_labels: jax.typing.ArrayLike, negatives: jax.typing.ArrayLike,
    negative_labels: jax.typing.ArrayLike, negative_valid: jax.typing.ArrayLike, *,
    temperature: float = 0.1, directional: bool = True, negative_sampling: bool = True,
    chunk_size: int = 8000, compute_dtype: Optional[jnp.dtype] = None
) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """Unreduced eq. 6: `l_i = lse_i - <a_i, t_i> / tau` for every anchor (no mask applied).

  Args:
    anchors: `[N, D]` anchor features (normalised here; gradients flow).
    targets: `[N, D]` their positives (normalised here; stop-gradient when `directional`).
    anchor_labels: `[N]` int pseudo-labels of the anchors.
    negatives, negative_labels, negative_valid: `[M, D]`, `[M]`, `[M]` (constants).
    temperature, negative_sampling, chunk_size, compute_dtype: see `negative_log_sum_exp`.
    directional: stop the gradient into `targets` (the directional alignment); False gives
      the vanilla (bilateral) contrastive loss.

  Returns:
    `(loss [N] float32, aux)` with aux `pos_sim [N]`, `neg_sim_sum [N]`, `neg_count [N]`.
  """
  a = ops.l2_normalize(anchors)
  t = ops.l2_normalize(targets)
  if directional:
    t = lax.stop_gradient(t)
  pos_sim = jnp.sum(a * t, axis=-1)
  pos = pos_sim / temperature
  neg = ops.l2_normalize(lax.stop_gradient(jnp.asarray(negatives, jnp.float32)))
  lse, sim_sum, count = negative_log_sum_exp(
      a, pos, anchor_labels, neg, negative_labels, negative_valid, temperature=temperature,
      negative_sampling=negative_sampling, chunk_size=chunk_size, compute_dtype=compute_dtype)
  return lse - pos, {"pos_sim": lax.stop_gradient(pos_sim), "neg_sim_sum": sim_sum,
                     "neg_count": count}


def directional_masks(confidence1: jax.typing.ArrayLike, confidence2: jax.typing.ArrayLike,
                      pair_valid: jax.typing.ArrayLike, *, threshold: float = 0.75,
                      directional: bool = True) -> Tuple[jax.Array, jax.Array]:
  """Eqs. 2 and 7: which pairs teach view 1 (`M_1`) and which teach view 2 (`M_2`).

  `M_1 = [c_2 > gamma] & [c_1 < c_2]` (strict inequalities, as the official code), symmetric
  for `M_2`. With `directional=False` the confidence comparison is dropped (both directions
  taught wherever the target is confident).

  Args:
    confidence1, confidence2: `[N]` max softmax probability of each side.
    pair_valid: `[N]` bool, a real pair (both pixels inside the overlap, not padding).
    threshold: gamma (0.75); 0 keeps every pair (no positive filtering).
    directional: apply the direction `c_anchor < c_target`.

  Returns:
    `(M_1, M_2)`, `[N]` bool each.
  """
  c1 = lax.stop_gradient(jnp.asarray(confidence1, jnp.float32))
  c2 = lax.stop_gradient(jnp.asarray(confidence2, jnp.float32))
  valid = jnp.asarray(pair_valid, bool)
  m1 = valid & (c2 > threshold)
  m2 = valid & (c1 > threshold)
  if directional:
    m1 &= c1 < c2
    m2 &= c2 < c1
  return m1, m2


def directional_contrastive_loss(
    features1: jax.typing.ArrayLike, features2: jax.typing.ArrayLike,
    confidence1: jax.typing.ArrayLike, confidence2: jax.typing.ArrayLike,
    labels1: jax.typing.ArrayLike, labels2: jax.typing.ArrayLike,
    pair_valid: jax.typing.ArrayLike, negatives: jax.typing.ArrayLike,
    negative_labels: jax.typing.ArrayLike, negative_valid: jax.typing.ArrayLike, *,
    memory: Optional[Tuple[jax.typing.ArrayLike, jax.typing.ArrayLike,
                           jax.typing.ArrayLike]] = None,
    temperature: float = 0.1, threshold: float = 0.75, directional: bool = True,
    negative_sampling: bool = True, chunk_size: int = 8000,
    compute_dtype: Optional[jnp.dtype] = None, reduction: str = "selected",
    pairs_per_image: int = 0,
    axis_name: Optional[str] = None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """CAC's L_dc^{ns,pf} (eqs. 1-8): both directions over aligned pairs, negatives at scale.

  Args:
    features1: `[N, D]` view-1 features of the pairs (e.g. the overlap, flattened; gradients
      flow).
    features2: `[N, D]` view-2 features of the same pixels, row for row.
    confidence1, confidence2: `[N]` classifier confidence (max softmax) of each side.
    labels1, labels2: `[N]` int pseudo-labels (argmax) of each side.
    pair_valid: `[N]` bool, rows that are real pairs.
    negatives: `[M, D]` negative features of this batch (e.g. every pixel of both views; no
      gradient); a device's shard under `axis_name`, all-gathered here.
    negative_labels: `[M]` int pseudo-labels of the negatives.
    negative_valid: `[M]` bool.
    memory: optional `(features [K, D], labels [K], valid [K])` of past steps
      (`semijax.banks.queue`), identical on every device (not gathered).
    temperature: tau (0.1).
    threshold: gamma of the positive filtering (0.75; 0 disables it).
    directional: the directional mask and stop-gradient (False: vanilla contrastive loss).
    negative_sampling: drop negatives sharing the anchor's pseudo-label.
    chunk_size: negatives per streamed chunk (official 8000).
    compute_dtype: dtype of the similarity matmuls (default float32).
    reduction: 'selected' (official: each direction divided by its number of selected pairs)
      or 'per_image' (paper eqs. 1, 8: per image divided by its number of valid pairs N_b,
      then averaged over the B images).
    pairs_per_image: for 'per_image': the rows are B consecutive blocks of this many pairs
      (e.g. an image's h x w grid).
    axis_name: inside `pmap`/`shard_map`: negatives are gathered over devices, each direction
      is normalised by its global count (selected pairs, or images), the value is the global
      one and each device's features get exactly their share of its gradient.

  Returns:
    `(loss, aux)`: scalar float32 `L_1 + L_2`, exactly 0 with zero gradients when no pair is
    selected; aux: `loss_1`, `loss_2`, `num_selected_1`, `num_selected_2`, `num_pairs`,
    `num_negatives`, `pos_sim_mean`, `neg_sim_mean`, `negatives_per_anchor` (scalars) and
    `selection` (a dict of arrays: `anchor_mask_1`, `anchor_mask_2` `[N]` bool and
    `negative_valid` `[M_total]` bool over the gathered negatives then the memory; pop it
    before logging).

  Example:
    >>> f = jax.random.normal(jax.random.key(0), (6, 4))
    >>> conf1, conf2 = jnp.full(6, 0.5), jnp.full(6, 0.9)   # view 2 teaches view 1
    >>> y = jnp.array([0, 0, 1, 1, 2, 2])
    >>> loss, aux = directional_contrastive_loss(f, f, conf1, conf2, y, y, jnp.ones(6, bool),
    ...                                          f, y, jnp.ones(6, bool))
    >>> int(aux["num_selected_1"]), int(aux["num_selected_2"])
    (6, 0)
  """
  if reduction not in REDUCTIONS:
    raise ValueError(f"reduction={reduction!r}; expected one of {REDUCTIONS}")
  f1 = jnp.asarray(features1, jnp.float32)
  f2 = jnp.asarray(features2, jnp.float32)
  if reduction == "per_image" and (pairs_per_image <= 0 or f1.shape[0] % pairs_per_image):
    raise ValueError(f"reduction='per_image' needs pairs_per_image dividing the {f1.shape[0]} "
                     f"rows, got {pairs_per_image}")
  y1 = jnp.asarray(labels1, jnp.int32).reshape(-1)
  y2 = jnp.asarray(labels2, jnp.int32).reshape(-1)
  m1, m2 = directional_masks(jnp.reshape(confidence1, -1), jnp.reshape(confidence2, -1),
                             jnp.reshape(pair_valid, -1), threshold=threshold,
                             directional=directional)
  neg = collectives.all_gather(jnp.asarray(negatives, jnp.float32), axis_name,
                               differentiable=False)
  neg_lab = collectives.all_gather(jnp.asarray(negative_labels, jnp.int32).reshape(-1),
                                   axis_name, differentiable=False)
  neg_val = collectives.all_gather(jnp.asarray(negative_valid, bool).reshape(-1), axis_name,
                                   differentiable=False)
  if memory is not None:
    mem_f, mem_l, mem_v = memory
    neg = jnp.concatenate([neg, lax.stop_gradient(jnp.asarray(mem_f, jnp.float32))])
    neg_lab = jnp.concatenate([neg_lab, jnp.asarray(mem_l, jnp.int32).reshape(-1)])
    neg_val = jnp.concatenate([neg_val, jnp.asarray(mem_v, bool).reshape(-1)])

  n = f1.shape[0]
  kw = dict(temperature=temperature, directional=directional,
            negative_sampling=negative_sampling, chunk_size=chunk_size,
            compute_dtype=compute_dtype)
  if directional:
    # A pair teaches at most one side (c_1 < c_2 or c_2 < c_1), so one row per pair: view 1 as
    # the anchor where M_1, view 2 where M_2 (either where neither: masked out). Half the work of
    # running both directions over every pair.
    rows, aux = directional_pair_losses(
        jnp.where(m2[:, None], f2, f1), jnp.where(m2[:, None], f1, f2),
        jnp.where(m2, y2, y1), neg, neg_lab, neg_val, **kw)
    per_pair = jnp.concatenate([rows, rows])
    aux = {k: jnp.concatenate([v, v]) for k, v in aux.items()}
  else:
    # Both directions over every pair: anchors [phi_1 ; phi_2], targets swapped.
    per_pair, aux = directional_pair_losses(
        jnp.concatenate([f1, f2]), jnp.concatenate([f2, f1]), jnp.concatenate([y1, y2]),
        neg, neg_lab, neg_val, **kw)
  mask = jnp.concatenate([m1, m2])

  pair_valid_f = jnp.reshape(pair_valid, -1).astype(jnp.float32)

  def direction(losses, sel):
    count = lax.stop_gradient(
        collectives.global_sum(jnp.sum(sel.astype(jnp.float32)), axis_name))
    masked = jnp.where(sel, losses, 0.0)
    if reduction == "selected":
      total = collectives.global_sum(jnp.sum(masked), axis_name)
      return total / jnp.maximum(count, 1.0), count
    per_image = jnp.sum(masked.reshape(-1, pairs_per_image), axis=1)
    n_b = jnp.sum(pair_valid_f.reshape(-1, pairs_per_image), axis=1)
    total = collectives.global_sum(jnp.sum(per_image / jnp.maximum(n_b, 1.0)), axis_name)
    images = collectives.global_sum(jnp.asarray(per_image.shape[0], jnp.float32), axis_name)
    return total / lax.stop_gradient(images), count

  loss_1, count_1 = direction(per_pair[:n], m1)
  loss_2, count_2 = direction(per_pair[n:], m2)
  gsum = lambda x: lax.stop_gradient(collectives.global_sum(x, axis_name))  # noqa: E731
  sel_f = mask.astype(jnp.float32)
  num_sel = jnp.maximum(count_1 + count_2, 1.0)
  neg_terms = gsum(jnp.sum(aux["neg_count"] * sel_f))
  result = {
      "loss_1": loss_1,
      "loss_2": loss_2,
      "num_selected_1": count_1,
      "num_selected_2": count_2,
      "num_pairs": gsum(jnp.sum(jnp.reshape(pair_valid, -1).astype(jnp.float32))),
      "num_negatives": jnp.sum(neg_val.astype(jnp.float32)),
      "pos_sim_mean": gsum(jnp.sum(aux["pos_sim"] * sel_f)) / num_sel,
      "neg_sim_mean": gsum(jnp.sum(aux["neg_sim_sum"] * sel_f)) / jnp.maximum(neg_terms, 1.0),
      "negatives_per_anchor": neg_terms / num_sel,
      "selection": {"anchor_mask_1": m1, "anchor_mask_2": m2, "negative_valid": neg_val},
  }
  return loss_1 + loss_2, result
