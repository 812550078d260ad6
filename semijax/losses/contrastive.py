"""Density-guided contrastive loss of DGCL (Wang et al., CVPR 2023, eqs. 12-13).

With z the L2-normalised projections, anchors q in Q^c, centre r^c and negatives R^{c,-},

  r^c  = normalize(mean_{r in R^{c,+}} z_r)                                       (eq. 12)
  l(q) = -log  exp(z_q.r^c/t) / (exp(z_q.r^c/t) + sum_{r-} exp(z_q.z_r-/t))   form='supcon'
  l(q) = -log  exp(z_q.r^c/t) /                   sum_{r-} exp(z_q.z_r-/t)    form='paper'
  L    = mean_{c present} mean_{q in Q^c} l(q)                                    (eq. 13)

`supcon` is the official code (`compute_dgcl_loss`): the positive is in the denominator, and
`log(sum exp(logits - max) + eps)` with `eps = 1e-6` after subtracting the (detached) row max.
`paper` is eq. 13 as printed (positive left out of the denominator; a class needs at least one
negative). The paper sums over anchors and classes; the code (and we) average over anchors per
class, then over classes. The paper's centre is g(mean of the key features); the code
averages the keys' projections before normalising (no head inside a loss, so we do the same).

Anchors carry gradients; the centre and negatives are `stop_gradient`.
"""

from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from semijax import _deprecation, collectives, ops
from semijax.banks import fifo
from semijax.sampling import density as density_lib, dgcl as dgcl_sampling

FORMS = ("supcon", "paper")


def key_centre(keys: jax.typing.ArrayLike, key_valid: jax.typing.ArrayLike, *,
               normalize_keys: bool = False) -> Tuple[jax.Array, jax.Array]:
  """Eq. 12: the class centre from its positive keys.

  Args:
    keys: `[C, P, D]` raw projections of the positive keys (batch and bank), no gradient.
    key_valid: `[C, P]` bool.
    normalize_keys: if True, average the L2-normalised keys (a variant); the official code
      averages the raw keys (False).

  Returns:
    `(centre, valid)`: `[C, D]` float32 unit vectors (0 where invalid) and `[C]` bool (the
    class has at least one key).
  """
  keys = lax.stop_gradient(jnp.asarray(keys, jnp.float32))
  if normalize_keys:
    keys = ops.l2_normalize(keys)
  w = jnp.asarray(key_valid, jnp.float32)
  n = jnp.sum(w, axis=1)
  mean = jnp.sum(keys * w[..., None], axis=1) / jnp.maximum(n, 1.0)[:, None]
  return ops.l2_normalize(mean), n > 0


def dgcl_anchor_losses(anchors: jax.typing.ArrayLike, centre: jax.typing.ArrayLike,
                       negatives: jax.typing.ArrayLike, negative_valid: jax.typing.ArrayLike,
                       *, temperature: float = 0.5, form: str = "supcon",
                       eps: float = 1e-6) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Unreduced eq. 13: one loss per anchor.

  Args:
    anchors: `[C, A, D]` raw anchor projections (gradients flow).
    centre: `[C, D]` class centres (normalised here; no gradient).
    negatives: `[C, Nn, D]` raw negative projections (no gradient).
    negative_valid: `[C, Nn]` bool.
    temperature: tau (0.5).
    form: 'supcon' (official) or 'paper'.
    eps: added inside the log of the max-shifted denominator (official 1e-6).

  Returns:
    `(loss, pos_sim, neg_sim)`: `[C, A]` per-anchor losses (finite everywhere), `[C, A]`
    anchor-centre cosines and `[C, A, Nn]` anchor-negative cosines.
  """
  if form not in FORMS:
    raise ValueError(f"form={form!r}; expected one of {FORMS}")
  a = ops.l2_normalize(jnp.asarray(anchors, jnp.float32))
  r = ops.l2_normalize(lax.stop_gradient(jnp.asarray(centre, jnp.float32)))
  neg = ops.l2_normalize(lax.stop_gradient(jnp.asarray(negatives, jnp.float32)))
  nv = jnp.asarray(negative_valid, bool)[:, None, :]  # [C, 1, Nn]
  pos_sim = jnp.einsum("cad,cd->ca", a, r)
  neg_sim = jnp.einsum("cad,cnd->can", a, neg)
  l_pos = pos_sim / temperature
  l_neg = neg_sim / temperature
  # Detached row max over the logits in play (the positive always is: it keeps m finite).
  m = lax.stop_gradient(jnp.maximum(l_pos, jnp.max(jnp.where(nv, l_neg, -jnp.inf), -1)))
  neg_sum = jnp.sum(jnp.where(nv, jnp.exp(jnp.where(nv, l_neg - m[..., None], 0.0)), 0.0), -1)
  if form == "supcon":
    denom = jnp.exp(l_pos - m) + neg_sum
  else:
    # No negative: the anchor is dropped by `dgcl_loss`; keep the value finite meanwhile.
    denom = jnp.where(jnp.any(nv, -1), neg_sum, 1.0)
  loss = -(l_pos - m - jnp.log(denom + eps))
  return loss, pos_sim, neg_sim


def dgcl_loss(anchors: jax.typing.ArrayLike, centre: jax.typing.ArrayLike,
              negatives: jax.typing.ArrayLike, anchor_valid: jax.typing.ArrayLike,
              negative_valid: jax.typing.ArrayLike,
              centre_valid: Optional[jax.typing.ArrayLike] = None, *,
              temperature: float = 0.5, form: str = "supcon",
              eps: float = 1e-6) -> Tuple[jax.Array, dict]:
  """DGCL contrastive loss (eq. 13) over selected anchors, centres and negatives.

  The inputs are global (the same on every device); the value needs no collective and the
  gradient reaches whichever device owns each anchor row.

  Args:
    anchors: `[C, A, D]` raw anchor projections (gradients flow).
    centre: `[C, D]` centres from `key_centre` (no gradient).
    negatives: `[C, Nn, D]` raw negative projections (no gradient).
    anchor_valid: `[C, A]` bool.
    negative_valid: `[C, Nn]` bool.
    centre_valid: optional `[C]` bool (default: all).
    temperature: tau (0.5, paper and code).
    form: 'supcon' (official, positive in the denominator) or 'paper' (eq. 13 as printed).
    eps: official 1e-6 inside the log (0 gives the exact log-softmax).

  Returns:
    `(loss, aux)`: scalar float32, the mean over classes with at least one anchor (and, for
    'paper', one negative) of the mean anchor loss; exactly 0 with zero gradients when no
    class qualifies. aux: `num_classes`, `num_anchors`, `pos_sim_mean`, `neg_sim_mean`.
  """
  per_anchor, pos_sim, neg_sim = dgcl_anchor_losses(
      anchors, centre, negatives, negative_valid, temperature=temperature, form=form,
      eps=eps)
  av = jnp.asarray(anchor_valid, bool)
  nv = jnp.asarray(negative_valid, bool)
  cls_valid = jnp.any(av, axis=1)
  if centre_valid is not None:
    cls_valid &= jnp.asarray(centre_valid, bool)
  if form == "paper":
    cls_valid &= jnp.any(nv, axis=1)
  av = av & cls_valid[:, None]
  n_a = jnp.sum(av, axis=1).astype(jnp.float32)
  per_class = jnp.sum(jnp.where(av, per_anchor, 0.0), axis=1) / jnp.maximum(n_a, 1.0)
  loss = ops.masked_mean(per_class, cls_valid)
  pairs = av[:, :, None] & nv[:, None, :]
  aux = {
      "num_classes": jnp.sum(cls_valid).astype(jnp.float32),
      "num_anchors": jnp.sum(n_a),
      "pos_sim_mean": lax.stop_gradient(ops.masked_mean(pos_sim, av)),
      "neg_sim_mean": lax.stop_gradient(ops.masked_mean(neg_sim, pairs)),
  }
  return loss, aux


@_deprecation.renamed_args({"max_pixels_per_class": "max_per_class"})
def dgcl_contrastive_loss(
    projections: jax.typing.ArrayLike,
    features: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    bank: fifo.ClassBank,
    rng: jax.Array,
    *,
    num_anchors: int = 200,
    num_batch_keys: int = 50,
    num_bank_keys: int = 50,
    num_negatives: int = 512,
    max_per_class: Optional[int] = 10000,
    ks: Sequence[int] = density_lib.DEFAULT_KS,
    temperature: float = 0.5,
    form: str = "supcon",
    eps: float = 1e-6,
    exclude_classes: Sequence[int] = (0,),
    wait_for_full_bank: bool = True,
    small_class_density: Optional[float] = 1.0,
    normalize_keys: bool = False,
    ignore_index: int = ops.IGNORE_INDEX,
    chunk_size: int = density_lib.DEFAULT_CHUNK,
    compute_dtype: Optional[jnp.dtype] = None,
    axis_name: Optional[str] = None,
) -> Tuple[jax.Array, dict]:
  """DGCL's L_contra: density-guided sampling (eqs. 7-11) + centre (12) + loss (13).

  Defaults are the official code's (`Gavinwxy/DGCL`); the paper's counts are 256 anchors and
  256 + 256 keys. The bank (`semijax.sampling.dgcl.init_bank`/`push_bank`) is read, not
  updated: push after the optimizer step, as the official code does.

  Args:
    projections: `[B, h, w, D]` student projections z (gradients flow to the anchors).
    features: `[B, h, w, Dv]` student features v used for density (no gradient).
    labels: `[B, h, w]` int contrastive labels (GT + filtered pseudo-labels, `ignore_index`).
    bank: DGCL `ClassBank` (fields `feature`, `projection`, `density`).
    rng: PRNG key.
    num_anchors, num_batch_keys, num_bank_keys, num_negatives, max_per_class, ks,
      exclude_classes, small_class_density: see `semijax.sampling.dgcl.sample`
      (deprecated alias of `max_per_class`: `max_pixels_per_class`).
    temperature, form, eps: see `dgcl_loss`.
    wait_for_full_bank: official: the loss is 0 until every class bank holds K items (the
      whole computation is skipped with `lax.cond` until then).
    normalize_keys: see `key_centre`.
    ignore_index: label that never counts.
    chunk_size, compute_dtype: density computation (see `density.knn_density`).
    axis_name: inside `pmap`/`shard_map`: anchors, keys and negatives are chosen over the
      global batch with device 0's key, the value is the global one on every device and each
      device's projections get exactly their share of its gradient.

  Returns:
    `(loss, aux)`: scalar float32 and a flat dict of scalars (sampling and loss diagnostics,
    `bank_full`) plus one non-scalar entry, `aux["selection"]`: the `DGCLSelection` of
    `semijax.sampling.dgcl.sample` (anchor, batch-key and negative indices into the flattened
    global batch `[D * B * h * w]`, bank-key slots, and their validity masks), so a caller can
    inspect what was contrasted. While `wait_for_full_bank` skips the loss it has the same
    shapes with every validity mask False. Pop it before logging `aux` as scalars.
  """
  projections = jnp.asarray(projections)
  features = jnp.asarray(features)
  proj = projections.reshape(-1, projections.shape[-1])
  feats = lax.stop_gradient(features.reshape(-1, features.shape[-1]))
  labels = jnp.asarray(labels).reshape(-1).astype(jnp.int32)
  proj = collectives.all_gather(proj, axis_name, differentiable=True)
  feats = collectives.all_gather(feats, axis_name, differentiable=False)
  labels = collectives.all_gather(labels, axis_name, differentiable=False)
  rng = collectives.same_rng(rng, axis_name)

  def compute(proj, feats, labels, bank, rng):
    sel, aux = dgcl_sampling.sample(
        feats, labels, bank, rng, num_anchors=num_anchors, num_batch_keys=num_batch_keys,
        num_bank_keys=num_bank_keys, num_negatives=num_negatives,
        max_per_class=max_per_class, ks=ks, exclude_classes=exclude_classes,
        small_class_density=small_class_density, ignore_index=ignore_index,
        chunk_size=chunk_size, compute_dtype=compute_dtype)
    anchors = jnp.take(proj, sel.anchor_idx, axis=0).astype(jnp.float32)
    batch_keys = lax.stop_gradient(jnp.take(proj, sel.batch_key_idx, axis=0))
    bank_keys = fifo.gather(bank, dgcl_sampling.PROJECTION, sel.bank_key_idx)
    keys = jnp.concatenate([batch_keys.astype(jnp.float32),
                            lax.stop_gradient(bank_keys).astype(jnp.float32)], axis=1)
    key_valid = jnp.concatenate([sel.batch_key_valid, sel.bank_key_valid], axis=1)
    centre, centre_valid = key_centre(keys, key_valid, normalize_keys=normalize_keys)
    negatives = lax.stop_gradient(jnp.take(proj, sel.negative_idx, axis=0))
    loss, loss_aux = dgcl_loss(anchors, centre, negatives, sel.anchor_valid,
                               sel.negative_valid, centre_valid & sel.class_valid,
                               temperature=temperature, form=form, eps=eps)
    aux.update(loss_aux)
    aux["selection"] = sel
    return loss, aux

  args = (proj, feats, labels, bank, rng)
  full = fifo.is_full(bank)
  if wait_for_full_bank:
    def skip(*operands):
      shapes = jax.eval_shape(compute, *operands)
      # A zero typed like every operand: under shard_map the branch outputs must carry the
      # union of the operands' varying axes, which `zeros_like` propagates.
      zero = sum(jnp.zeros_like(x.reshape(-1)[0], jnp.float32)
                 for x in jax.tree.leaves(operands[:4]))  # not the key
      return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype) + zero.astype(s.dtype),
                          shapes)
    loss, aux = lax.cond(full, compute, skip, *args)
  else:
    loss, aux = compute(*args)
  aux["bank_full"] = full.astype(jnp.float32)
  return loss, aux
