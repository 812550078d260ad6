"""Density-guided anchor and key sampling of DGCL (Wang et al., CVPR 2023, eqs. 9-12).

For every class c present in the (global) batch, with d(.) the multi-scale density of
`semijax.sampling.density` of a pixel's feature v against the class-c bank:

  Q^c          = {q : d(q) <= a}            the N_q lowest-density pixels      (eq. 9)
  R^{c,+}_local  = {r : d(r) >= b_local}    the top-density batch pixels       (eq. 10)
  R^{c,+}_global = {r : d(r) >= b_global}   the top bank entries, stored d     (eq. 11)
  R^{c,-}      = N_r^- random batch pixels with label != c (and != ignore)

The centre (eq. 12) and the loss (eq. 13) are in `semijax.losses.contrastive`.

Everything is fixed-size: the sampler returns `[C, n]` index arrays with validity masks;
classes absent from the batch (or excluded) have no valid slot. Official defaults
(`Gavinwxy/DGCL`, `compute_dgcl_loss`): 200 anchors (paper 256), 50 + 50 positive keys
(paper 256 + 256), 512 negatives, at most 10,000 candidate pixels per class (random subset),
class 0 excluded, density := 1 for classes with <= max(ks) candidate pixels.

The bank (`init_bank`, `push_bank`, `bank_from_entries`) is a `semijax.banks.fifo.ClassBank`
with fields `feature` (raw encoder features v), `projection` (raw projections z) and `density`
(the density of the item against its class bank at insertion time, never refreshed, as in the
official `FeatureMemory`).
"""

from typing import NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from semijax import _deprecation, collectives, ops
from semijax.banks import fifo
from semijax.sampling import density as density_lib

FEATURE = "feature"
PROJECTION = "projection"
DENSITY = "density"


class DGCLSelection(NamedTuple):
  """Fixed-size selections of `sample`, all rows indexed by class (a pytree).

  Pixel indices point into the flat `[N]` batch given to `sample`; bank indices point into
  the K slots of the class's bank.
  """
  anchor_idx: jax.Array  # [C, A] int32 pixel indices, lowest density first
  anchor_valid: jax.Array  # [C, A] bool
  batch_key_idx: jax.Array  # [C, Pb] int32 pixel indices, highest density first
  batch_key_valid: jax.Array  # [C, Pb] bool
  bank_key_idx: jax.Array  # [C, Pm] int32 bank slots, highest stored density first
  bank_key_valid: jax.Array  # [C, Pm] bool
  negative_idx: jax.Array  # [C, Nn] int32 pixel indices, random order
  negative_valid: jax.Array  # [C, Nn] bool
  class_valid: jax.Array  # [C] bool: present in the batch and not excluded


def init_bank(num_classes: int, capacity: int = 10000, *, feature_dim: int = 256,
              projection_dim: int = 256, dtype: jnp.dtype = jnp.float32) -> fifo.ClassBank:
  """An empty DGCL bank (official: 10,000 per class, 256-d `fts` and `rep`).

  Returns:
    `ClassBank` with `feature` `[C, K, feature_dim]`, `projection` `[C, K, projection_dim]`
    (both `dtype`) and `density` `[C, K]` float32.
  """
  return fifo.init(num_classes, capacity, {
      FEATURE: ((feature_dim,), dtype),
      PROJECTION: ((projection_dim,), dtype),
      DENSITY: ((), jnp.float32),
  })


def bank_from_entries(features: jax.typing.ArrayLike, projections: jax.typing.ArrayLike,
                      densities: jax.typing.ArrayLike,
                      count: Optional[jax.typing.ArrayLike] = None, *,
                      ptr: Optional[jax.typing.ArrayLike] = None) -> fifo.ClassBank:
  """A DGCL bank holding given contents (`fifo.from_entries` with DGCL's three fields).

  Args:
    features: `[C, K, Dv]` raw encoder features v (dtype kept).
    projections: `[C, K, D]` raw projections z (dtype kept).
    densities: `[C, K]` stored densities (float32), e.g. 1 for "already dense".
    count: `[C]` int items per class in `[0, K]` (default K: full, the loss then runs).
    ptr: `[C]` int next slot to write (default `count % K`).

  Returns:
    `ClassBank` with fields `feature`, `projection`, `density`, as `init_bank` builds.
  """
  return fifo.from_entries({FEATURE: features, PROJECTION: projections,
                            DENSITY: jnp.asarray(densities, jnp.float32)}, count, ptr=ptr)


def _flatten(x, trailing):
  x = jnp.asarray(x)
  return x.reshape((-1,) + x.shape[x.ndim - trailing:]) if trailing else x.reshape(-1)


@_deprecation.renamed_args({"max_per_class": "push_per_class"})
def push_bank(bank: fifo.ClassBank, features: jax.typing.ArrayLike,
              projections: jax.typing.ArrayLike, labels: jax.typing.ArrayLike,
              rng: jax.Array, *, push_per_class: int = 1000,
              ks: Sequence[int] = density_lib.DEFAULT_KS, min_bank_size: int = 1000,
              ignore_index: int = ops.IGNORE_INDEX, chunk_size: int = density_lib.DEFAULT_CHUNK,
              compute_dtype: Optional[jnp.dtype] = None,
              axis_name: Optional[str] = None) -> fifo.ClassBank:
  """DGCL's bank update (official `FeatureMemory.update`).

  For every class c (background included), at most `push_per_class` pixels labelled c are
  chosen uniformly at random without replacement from the global batch; their density
  against the *current* class-c bank is computed if that bank holds more than
  `min_bank_size` items (else 0), and (feature, projection, density) are written FIFO.
  Only the selected pixels' densities are computed, and only for classes whose density is
  stored (chunks of their valid queries, see `density.class_density`).

  Args:
    bank: from `init_bank`.
    features: `[..., Dv]` raw features (e.g. `[B, h, w, 256]`), no gradient.
    projections: `[..., D]` raw projections, same leading shape, no gradient.
    labels: `[...]` int contrastive labels (ignore_index = skip).
    rng: PRNG key.
    push_per_class: pixels pushed per class (official 1000; deprecated alias: `max_per_class`).
    ks: density neighbourhoods.
    min_bank_size: the stored density is computed only when the class's bank holds more items
      than this (official 1000), else it is 0.
    ignore_index: label to skip.
    chunk_size, compute_dtype: as `density.knn_density`.
    axis_name: mapped axis; gathers the batch and shares device 0's key (banks identical).

  Returns:
    The updated bank.
  """
  feats = _flatten(features, 1)
  projs = _flatten(projections, 1)
  labels = _flatten(labels, 0).astype(jnp.int32)
  feats = collectives.all_gather(feats, axis_name, differentiable=False)
  projs = collectives.all_gather(projs, axis_name, differentiable=False)
  labels = collectives.all_gather(labels, axis_name, differentiable=False)
  rng = collectives.same_rng(rng, axis_name)
  if push_per_class > bank.capacity:
    raise ValueError(f"push_per_class={push_per_class} exceeds capacity={bank.capacity}")
  idx, valid = fifo.select_per_class(labels, labels != ignore_index, rng,
                                     num_classes=bank.num_classes,
                                     max_per_class=push_per_class)
  # Density only where it is stored: the class's bank holds more than `min_bank_size`.
  dens = density_lib.class_density(feats, valid & (bank.count > min_bank_size)[:, None], bank,
                                   query_index=idx, field=FEATURE, ks=ks,
                                   chunk_size=chunk_size, compute_dtype=compute_dtype)
  return fifo.write(bank, {FEATURE: jnp.take(feats, idx, axis=0),
                           PROJECTION: jnp.take(projs, idx, axis=0), DENSITY: dens}, valid)


def sample_negatives(rng: jax.Array, labels: jax.typing.ArrayLike,
                     valid: jax.typing.ArrayLike, *, num_classes: int,
                     num: int) -> Tuple[jax.Array, jax.Array]:
  """For every class c, `num` valid items with a label other than c, uniformly without
  replacement and in random order (all of them, first, when there are fewer).

  One random permutation of the valid items is shared by all classes, and class c takes the
  first `num` items of it that are not labelled c. The restriction of a uniform random
  permutation to a subset is a uniform random permutation of that subset, so each class's
  draw has exactly the distribution of an independent uniform draw (`ops.random_subset` on
  the mask `label != c`); the draws of different classes are not independent. Cost: two
  sorts of N items and a `[C, num]` binary search, instead of a top-k over `C x N` random
  keys (issue 17).

  The j-th non-c item of the permutation sits at position j + m, m being the number of
  class-c items before it; the k-th class-c item (position pos_k) has pos_k - k non-c items
  before it, a non-decreasing sequence q_k, and m = #{k : q_k <= j}.

  Args:
    rng: PRNG key.
    labels: `[N]` int labels; valid items must have labels in `[0, C)`.
    valid: `[N]` bool, the items that may be drawn.
    num_classes: C.
    num: items per class (static, at most N).

  Returns:
    indices `[C, num]` int32 into the N items and valid `[C, num]` bool (a prefix per row).
  """
  labels = jnp.asarray(labels, jnp.int32).reshape(-1)
  valid = jnp.asarray(valid, bool).reshape(-1)
  n = labels.shape[0]
  iota = jnp.arange(n, dtype=jnp.int32)
  bits = jax.random.bits(rng, (n,), jnp.uint32)
  _, _, perm = lax.sort(((~valid).astype(jnp.int32), bits, iota), num_keys=2)
  n_valid = jnp.sum(valid, dtype=jnp.int32)
  cls = jnp.where(iota < n_valid, jnp.take(labels, perm), num_classes)  # C = not drawable
  # Positions of each class's items in the permutation, class by class, increasing.
  _, pos = lax.sort((cls, iota), num_keys=2)
  counts = jnp.zeros((num_classes + 1,), jnp.int32).at[cls].add(1)[:num_classes]
  starts = jnp.cumsum(counts) - counts
  rank = iota - jnp.take(jnp.concatenate([starts, jnp.array([n_valid])]),
                         jnp.take(cls, pos))   # within-class rank of sorted item t
  q = pos - rank   # non-c items before the k-th class-c item; non-decreasing per class
  j = jnp.arange(num, dtype=jnp.int32)[None, :]
  # m = #{k < count_c : q[start_c + k] <= j} by binary search on [lo, hi).
  hi = jnp.broadcast_to(counts[:, None], (num_classes, num))
  lo = jnp.zeros_like(hi)   # (typed like the inputs under shard_map)

  def bisect(_, bounds):
    lo, hi = bounds
    mid = (lo + hi) // 2
    below = (mid < hi) & (jnp.take(q, jnp.minimum(starts[:, None] + mid, n - 1)) <= j)
    return jnp.where(below, mid + 1, lo), jnp.where(below, hi, mid)

  m, _ = lax.fori_loop(0, max(1, int(n).bit_length()), bisect, (lo, hi))
  position = j + m
  ok = position < n_valid
  return jnp.where(ok, jnp.take(perm, jnp.minimum(position, n - 1)), 0), ok


def _masked_stats(x, mask):
  mask = mask.astype(jnp.float32)
  n = jnp.sum(mask)
  return jnp.sum(jnp.where(mask > 0, x, 0.0)) / jnp.maximum(n, 1.0)


@_deprecation.renamed_args({"max_pixels_per_class": "max_per_class"})
def sample(features: jax.typing.ArrayLike, labels: jax.typing.ArrayLike,
           bank: fifo.ClassBank, rng: jax.Array, *, num_anchors: int = 200,
           num_batch_keys: int = 50, num_bank_keys: int = 50, num_negatives: int = 512,
           max_per_class: Optional[int] = 10000,
           ks: Sequence[int] = density_lib.DEFAULT_KS,
           exclude_classes: Sequence[int] = (0,),
           small_class_density: Optional[float] = 1.0,
           ignore_index: int = ops.IGNORE_INDEX, chunk_size: int = density_lib.DEFAULT_CHUNK,
           compute_dtype: Optional[jnp.dtype] = None,
           axis_name: Optional[str] = None) -> Tuple[DGCLSelection, dict]:
  """Density-guided selection of anchors, positive keys and negatives (eqs. 9-11).

  With `axis_name=None` the inputs are the global batch. With `axis_name`, features and
  labels are all-gathered (as constants) and device 0's key is used, so the selection is the
  global one on every device and its pixel indices point into the gathered `[D * n]` batch,
  ordered by device.

  Per class c (labels in `[0, C)`, not in `exclude_classes`):
    1. candidates: the pixels labelled c, or a uniform random subset of `max_per_class` of
       them (official 10,000; None = all of them, at the cost of `[C, N]` index and density
       arrays);
    2. their density against bank c (eqs. 7-8); if `small_class_density` is not None and a
       class has at most max(ks) candidates, all its densities are set to that value
       (official rule, value 1; ties then fall in the candidates' random order, which only
       matters when `num_anchors` or `num_batch_keys` < max(ks));
    3. anchors: the `num_anchors` lowest densities (all candidates if fewer);
    4. batch keys: the `num_batch_keys` highest densities;
    5. bank keys: the `num_bank_keys` valid bank entries with the highest *stored* density;
    6. negatives: `num_negatives` pixels drawn uniformly without replacement among all batch
       pixels with a label in `[0, C)` other than c (background included), all if fewer
       (`sample_negatives`: every class's draw is uniform, the classes share one random
       permutation).

  Args:
    features: `[N, Dv]` (or `[..., Dv]`, flattened) raw features for density; no gradient.
    labels: `[N]` (or `[...]`) int contrastive labels with `ignore_index`.
    bank: `ClassBank` with fields `feature` and `density` (see `init_bank`).
    rng: PRNG key (subsampling and negatives).
    num_anchors: N_q (official 200, paper 256).
    num_batch_keys: half of N_r^+ from the batch (official 50, paper 256).
    num_bank_keys: half of N_r^+ from the bank (official 50, paper 256).
    num_negatives: N_r^- (512).
    max_per_class: candidate pixels considered per class (official 10,000; deprecated
      alias: `max_pixels_per_class`).
    ks: density neighbourhoods (8, 16, 32).
    exclude_classes: classes that get no anchors, keys or loss term; their pixels still
      serve as negatives (official: class 0, unconditionally, even Cityscapes' road).
    small_class_density: official constant density for tiny classes, or None.
    ignore_index: label that never counts.
    chunk_size, compute_dtype: as `density.knn_density`.
    axis_name: mapped axis, or None.

  Returns:
    `(selection, aux)`: a `DGCLSelection` and a flat dict of scalar diagnostics
    (`num_classes`, `anchors_per_class`, and mean densities of candidates, anchors, batch
    keys and bank keys).
  """
  feats = collectives.all_gather(_flatten(features, 1), axis_name, differentiable=False)
  labels = collectives.all_gather(_flatten(labels, 0).astype(jnp.int32), axis_name,
                                  differentiable=False)
  rng = collectives.same_rng(rng, axis_name)
  n = labels.shape[0]
  c = bank.num_classes
  rng_sub, rng_neg = jax.random.split(rng)
  in_range = (labels != ignore_index) & (labels >= 0) & (labels < c)

  m = n if max_per_class is None else min(int(max_per_class), n)
  cand_idx, cand_valid = fifo.select_per_class(labels, in_range, rng_sub, num_classes=c,
                                               max_per_class=m)  # [C, M]
  n_cand = jnp.sum(cand_valid, axis=1)
  allowed = jnp.ones((c,), bool)
  for e in exclude_classes:
    if 0 <= e < c:
      allowed = allowed.at[e].set(False)
  class_valid = allowed & (n_cand > 0)
  cand_valid = cand_valid & class_valid[:, None]

  # Candidate features are gathered chunk by chunk inside the density loop.
  dens = density_lib.class_density(feats, cand_valid, bank, query_index=cand_idx,
                                   field=FEATURE, ks=ks, chunk_size=chunk_size,
                                   compute_dtype=compute_dtype)  # [C, M]
  if small_class_density is not None:
    small = n_cand <= max(ks)
    dens = jnp.where(small[:, None], jnp.float32(small_class_density), dens)

  _, a_pos, a_valid = ops.masked_bottom_k(dens, cand_valid, min(num_anchors, m))
  _, b_pos, b_valid = ops.masked_top_k(dens, cand_valid, min(num_batch_keys, m))
  anchor_idx = jnp.take_along_axis(cand_idx, a_pos, axis=1)
  batch_key_idx = jnp.take_along_axis(cand_idx, b_pos, axis=1)

  _, bank_valid = fifo.read(bank)
  stored = bank.entries[DENSITY].astype(jnp.float32)
  _, m_idx, m_valid = ops.masked_top_k(stored, bank_valid & class_valid[:, None],
                                       min(num_bank_keys, bank.capacity))

  neg_idx, neg_valid = sample_negatives(rng_neg, labels, in_range, num_classes=c,
                                        num=min(num_negatives, n))
  neg_valid &= class_valid[:, None]

  selection = DGCLSelection(
      anchor_idx=anchor_idx, anchor_valid=a_valid,
      batch_key_idx=batch_key_idx, batch_key_valid=b_valid,
      bank_key_idx=m_idx, bank_key_valid=m_valid,
      negative_idx=neg_idx, negative_valid=neg_valid,
      class_valid=class_valid)
  num_classes = jnp.sum(class_valid).astype(jnp.float32)
  aux = {
      "num_classes": num_classes,
      "anchors_per_class": jnp.sum(a_valid).astype(jnp.float32) / jnp.maximum(num_classes, 1),
      "candidate_density_mean": _masked_stats(dens, cand_valid),
      "anchor_density_mean": _masked_stats(jnp.take_along_axis(dens, a_pos, axis=1), a_valid),
      "batch_key_density_mean": _masked_stats(jnp.take_along_axis(dens, b_pos, axis=1),
                                              b_valid),
      "bank_key_density_mean": _masked_stats(jnp.take_along_axis(stored, m_idx, axis=1),
                                             m_valid),
  }
  return selection, aux
