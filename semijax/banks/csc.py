"""CSC's category-wise memory bank with the consistency update and the separation gate.

CSC ("Consistency and Separation Regularization for Contrastive Learning in Semi-supervised
Semantic Segmentation", Sec. III-C and Algorithm 1) keeps a bank B of L unit feature vectors
per class (`semijax.banks.fifo.ClassBank` with one field, 'feature', `[C, L, D]`) and changes it
after every step in two gated moves:

* **consistency update** (eq. 8), f_cons: with z-bar^c the mean of this step's class-c features,
      alpha_c = L_c / (L_c + n_c)                                                     (8c)
      u <- Norm(alpha_c u + (1 - alpha_c) z-bar^c)   for every entry u of class c     (8b)
  (z-bar^c is normalised first in the paper, eq. 8a; the CSC candidate code uses the raw mean:
  `normalize_mean`);
* **enqueue/dequeue**, f_que: per image and class, the normalised mean feature of the class
  region and K = min(n, `pixels_per_class`) random pixel features are written FIFO;
* **Separ** (eq. 9), the separation of the class means u-bar^c = Norm(mean of B(c)):
      Separ = sum_{i, j} u-bar^i . u-bar^j + V,   V = C (C - 1)                      (9)
  (diagonal included; lower is more separated). Each move is kept only if the gate accepts
  it (`gate_accepts`): the separation improves on the bank before the move, or (with a
  `tolerance`) stays below the best value seen plus the tolerance. The best value is the
  running minimum of the values the moves leave, starting at 2 C^2 (candidate code).

The candidate code (`KJingfdu/CS@212c80a`, `MemoryBank`) gates a consistency update on
"improves" only and an enqueue on "below best + 1, or improves"; both moves are skipped
by the gate (the consistency update not applied at all) while some class bank is empty, as
Separ is undefined then. `gated_update` reproduces this; `GatedBank` is the pytree the state
holds. Everything is static-shape and jit-safe; bank entries never carry gradients.
"""

import dataclasses
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from semijax import collectives, ops
from semijax.banks import fifo

FEATURE = "feature"


def init(num_classes: int, capacity: int = 2000, dim: int = 256,
         dtype: jnp.dtype = jnp.float32) -> fifo.ClassBank:
  """An empty CSC bank: `feature` `[C, L, D]` (paper: L = S = 2000, D = 256)."""
  return fifo.init(num_classes, capacity, {FEATURE: ((dim,), dtype)})


def from_contents(features: jax.typing.ArrayLike,
                  count: Optional[jax.typing.ArrayLike] = None,
                  ptr: Optional[jax.typing.ArrayLike] = None) -> fifo.ClassBank:
  """A bank holding given entries (e.g. restored from another codebase, or a test fixture).

  Args:
    features: `[C, L, D]`; slots `[0, count[c])` of class c are its entries (stored as given:
      normalise them first if they are not unit vectors).
    count: `[C]` int entries per class (default: L, every class full).
    ptr: `[C]` int next write slot (default `count % L`, i.e. the oldest entry of a full
      class, right after the last one of a partly filled class).

  Returns:
    `fifo.ClassBank` with field 'feature'.

  Raises:
    ValueError: for shapes that do not match or counts outside `[0, L]`.
  """
  features = jnp.asarray(features)
  if features.ndim != 3:
    raise ValueError(f"features must be [C, L, D], got shape {features.shape}")
  c, k, _ = features.shape
  count = np.full((c,), k) if count is None else count
  if isinstance(count, (np.ndarray, list, tuple)):   # concrete: check it (not under jit)
    count_np = np.asarray(count)
    if count_np.shape != (c,) or count_np.min(initial=0) < 0 or count_np.max(initial=0) > k:
      raise ValueError(f"count must be [C={c}] ints in [0, {k}], got {count_np}")
  count = jnp.asarray(count, jnp.int32)
  ptr = count % k if ptr is None else jnp.asarray(ptr, jnp.int32)
  slot_valid = jnp.arange(k)[None, :, None] < count[:, None, None]
  return fifo.ClassBank(entries={FEATURE: jnp.where(slot_valid, features, 0)}, ptr=ptr,
                        count=count)


def contents(bank: fifo.ClassBank) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """The bank as a flat key set: features `[C L, D]`, labels `[C L]` int32, valid `[C L]`."""
  feats, valid = fifo.read(bank)
  feats = feats[FEATURE]
  c, k = valid.shape
  labels = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32)[:, None], (c, k))
  return (lax.stop_gradient(feats.reshape(c * k, -1)), labels.reshape(-1),
          valid.reshape(-1))


def is_complete(bank: fifo.ClassBank) -> jax.Array:
  """Scalar bool: every class holds at least one entry (the code's `len(bank) > 0`)."""
  return jnp.all(bank.count > 0)


def class_means(bank: fifo.ClassBank) -> Tuple[jax.Array, jax.Array]:
  """Eq. 9b: u-bar^c = Norm(mean of the class-c entries).

  Returns:
    `(means, nonempty)`: `[C, D]` float32 unit vectors (0 for an empty class) and `[C]` bool.
  """
  feats = lax.stop_gradient(bank.entries[FEATURE]).astype(jnp.float32)
  valid = (jnp.arange(bank.capacity)[None, :] < bank.count[:, None]).astype(jnp.float32)
  sums = jnp.einsum("ckd,ck->cd", feats, valid)
  means = sums / jnp.maximum(bank.count.astype(jnp.float32), 1.0)[:, None]
  return ops.l2_normalize(means), bank.count > 0


def separation(bank: fifo.ClassBank, *, offset: Optional[float] = None) -> jax.Array:
  """Eq. 9: Separ = sum_{i, j} u-bar^i . u-bar^j + V (diagonal included; lower = more separate).

  Computed as `|sum_i u-bar^i|^2 + V`, which is the same double sum.

  Args:
    bank: the bank.
    offset: V; default C (C - 1) (candidate code), which keeps Separ >= 0 for a complete
      bank (the double sum is >= -C).

  Returns:
    Scalar float32. An empty class contributes a zero mean; gate only complete banks
    (`is_complete`), as the code does.
  """
  means, _ = class_means(bank)
  c = bank.num_classes
  v = float(c * (c - 1)) if offset is None else float(offset)
  total = jnp.sum(means, axis=0)
  return jnp.sum(total * total) + v


def gate_accepts(new: jax.typing.ArrayLike, old: jax.typing.ArrayLike,
                 best: jax.typing.ArrayLike, *, tolerance: Optional[float] = None,
                 improve: bool = True) -> jax.Array:
  """The separation gate of Algorithm 1: is a bank update kept?

  Accepts iff (`improve` and new < old) or (`tolerance` is given and new < best + tolerance).
  Algorithm 1: `improve=True, tolerance=None`; the paper's text ("within a range x of the
  best Separ"): `improve=False, tolerance=x`; the candidate code: consistency updates
  `improve=True, tolerance=None`, enqueues `improve=True, tolerance=1`.

  Args:
    new: Separ of the bank after the update.
    old: Separ before it (+inf when the old bank was incomplete: any complete bank improves
      on it).
    best: the best (lowest) Separ seen.
    tolerance: x, or None for no best-based acceptance.
    improve: accept an update that lowers Separ.

  Returns:
    Scalar bool.
  """
  if tolerance is None and not improve:
    raise ValueError("gate_accepts needs improve=True or a tolerance; it would reject all")
  new = jnp.asarray(new, jnp.float32)
  accept = jnp.zeros((), bool)
  if improve:
    accept |= new < jnp.asarray(old, jnp.float32)
  if tolerance is not None:
    accept |= new < jnp.asarray(best, jnp.float32) + tolerance
  return accept


def consistency_update(bank: fifo.ClassBank, features: jax.typing.ArrayLike,
                       labels: jax.typing.ArrayLike, valid: jax.typing.ArrayLike, *,
                       normalize_mean: bool = False,
                       axis_name: Optional[str] = None) -> Tuple[fifo.ClassBank, dict]:
  """Eq. 8: moves every entry of each class present towards the batch class mean.

  For a class c with n_c > 0 valid features here and L_c entries in the bank, every entry
  becomes `Norm(alpha_c u + (1 - alpha_c) z-bar^c)` with `alpha_c = L_c / (L_c + n_c)`;
  entries stay unit vectors, slots, `ptr` and `count` are unchanged, other classes untouched.

  Args:
    bank: the bank (field 'feature').
    features: `[N, D]` this step's features (the code: the sampled anchors; no gradient).
    labels: `[N]` int class per feature (values outside `[0, C)` are skipped).
    valid: `[N]` bool.
    normalize_mean: z-bar^c = Norm(mean) as eq. 8a (True) or the raw mean (candidate code,
      False).
    axis_name: inside `pmap`/`shard_map`, the features are this device's shard and the class
      means are over every device's (psum of sums and counts).

  Returns:
    `(bank, aux)`: aux has `alpha` `[C]` (1 for absent classes) and `present` `[C]` bool.
  """
  c = bank.num_classes
  feats = lax.stop_gradient(jnp.asarray(features, jnp.float32))
  feats = feats.reshape(-1, feats.shape[-1])
  labels = jnp.asarray(labels, jnp.int32).reshape(-1)
  ok = jnp.asarray(valid, bool).reshape(-1) & (labels >= 0) & (labels < c)
  cls = jnp.where(ok, labels, c)
  sums = jax.ops.segment_sum(jnp.where(ok[:, None], feats, 0.0), cls, num_segments=c + 1)[:c]
  counts = jnp.zeros((c + 1,), jnp.float32).at[cls].add(1.0)[:c]
  sums = lax.stop_gradient(collectives.global_sum(sums, axis_name))
  counts = lax.stop_gradient(collectives.global_sum(counts, axis_name))
  mean = sums / jnp.maximum(counts, 1.0)[:, None]
  if normalize_mean:
    mean = ops.l2_normalize(mean)
  length = bank.count.astype(jnp.float32)
  present = counts > 0
  alpha = jnp.where(present, length / jnp.maximum(length + counts, 1.0), 1.0)
  old = bank.entries[FEATURE]
  moved = ops.l2_normalize(alpha[:, None, None] * old.astype(jnp.float32)
                           + (1.0 - alpha)[:, None, None] * mean[:, None, :])
  slot_valid = jnp.arange(bank.capacity)[None, :] < bank.count[:, None]
  change = (present[:, None] & slot_valid)[..., None]
  new = jnp.where(change, moved.astype(old.dtype), old)
  return (dataclasses.replace(bank, entries={**bank.entries, FEATURE: new}),
          {"alpha": alpha, "present": present})


def enqueue_items(features: jax.typing.ArrayLike, labels: jax.typing.ArrayLike,
                  valid: Optional[jax.typing.ArrayLike], rng: jax.Array, *, num_classes: int,
                  pixels_per_class: int = 20, region_means: bool = True,
                  image_ids: Optional[jax.typing.ArrayLike] = None
                  ) -> Tuple[jax.Array, jax.Array]:
  """What f_que writes for each image: per class, the region mean and K random pixels.

  Per image b and class c with n_bc > 0 pixels (candidate code, `dequeue_enqueue`):
  `Norm(mean of the class-c pixel features)` (if `region_means`), then K = min(n_bc,
  `pixels_per_class`) of its pixel features (normalised) drawn uniformly without
  replacement. Image b draws from `fold_in(rng, image_ids[b])`.

  Args:
    features: `[B, h, w, D]` features (no gradient).
    labels: `[B, h, w]` int labels at the same resolution (ignore / out of range skipped).
    valid: optional `[B, h, w]` bool.
    rng: PRNG key.
    num_classes: C.
    pixels_per_class: K (the code's `pixel_update_freq`; CSC's U_f, see BUILD_NOTES).
    region_means: write the region mean before the pixels.
    image_ids: `[B]` global image indices (default `arange(B)`).

  Returns:
    `(items, items_valid)`: `[B, C, P, D]` float32 and `[B, C, P]` bool, P = K (+1 with
    region means); per (b, c) the mean first, then the pixels.
  """
  feats = lax.stop_gradient(jnp.asarray(features, jnp.float32))
  b = feats.shape[0]
  d = feats.shape[-1]
  n = int(np.prod(feats.shape[1:-1]))
  c, k = num_classes, pixels_per_class
  feats = ops.l2_normalize(feats.reshape(b, n, d))
  lab = jnp.asarray(labels, jnp.int32).reshape(b, n)
  ok = (lab >= 0) & (lab < c)
  if valid is not None:
    ok &= jnp.asarray(valid, bool).reshape(b, n)
  cls = jnp.where(ok, lab, c)
  counts_all = jax.vmap(lambda g: jnp.zeros((c + 1,), jnp.int32).at[g].add(1))(cls)
  counts = counts_all[:, :c]
  if image_ids is None:
    image_ids = jnp.arange(b, dtype=jnp.int32)
  bits = jax.vmap(lambda i: jax.random.bits(jax.random.fold_in(rng, i), (n,), jnp.uint32))(
      jnp.asarray(image_ids, jnp.int32))
  iota = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
  _, _, perm = lax.sort((cls, bits, iota), dimension=1, num_keys=2)
  starts = (jnp.cumsum(counts_all, axis=1) - counts_all)[:, :c]
  j = jnp.arange(k, dtype=jnp.int32)[None, None, :]
  pix_valid = j < counts[..., None]
  pos = jnp.clip(starts[..., None] + j, 0, n - 1).reshape(b, c * k)
  pix_idx = jnp.take_along_axis(perm, pos, axis=1)
  pix = jnp.take_along_axis(feats, pix_idx[..., None], axis=1).reshape(b, c, k, d)
  pix = jnp.where(pix_valid[..., None], pix, 0.0)
  if not region_means:
    return pix, pix_valid
  sums = jax.vmap(lambda f, g: jax.ops.segment_sum(f, g, num_segments=c + 1))(
      jnp.where(ok[..., None], feats, 0.0), cls)[:, :c]
  means = ops.l2_normalize(sums / jnp.maximum(counts, 1)[..., None].astype(jnp.float32))
  items = jnp.concatenate([means[:, :, None], pix], axis=2)
  items_valid = jnp.concatenate([(counts > 0)[..., None], pix_valid], axis=2)
  return items, items_valid


def enqueue(bank: fifo.ClassBank, items: jax.typing.ArrayLike,
            items_valid: jax.typing.ArrayLike, *,
            axis_name: Optional[str] = None) -> fifo.ClassBank:
  """f_que: writes `enqueue_items`' output FIFO, image by image (the code's order).

  Args:
    bank: the bank.
    items: `[B, C, P, D]` from `enqueue_items`.
    items_valid: `[B, C, P]` bool.
    axis_name: inside `pmap`/`shard_map`, `items` are this device's images; every device's
      are gathered (in device order) so that the banks stay identical.

  Returns:
    The bank after the writes.
  """
  items = collectives.all_gather(jnp.asarray(items), axis_name, differentiable=False)
  items_valid = collectives.all_gather(jnp.asarray(items_valid, bool), axis_name,
                                       differentiable=False)
  b, c, p = items_valid.shape
  if c != bank.num_classes:
    raise ValueError(f"items have {c} classes, the bank {bank.num_classes}")
  per_class = jnp.swapaxes(items, 0, 1).reshape(c, b * p, items.shape[-1])
  per_valid = jnp.swapaxes(items_valid, 0, 1).reshape(c, b * p)
  return fifo.write(bank, {FEATURE: per_class}, per_valid)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GatedBank:
  """A CSC bank and the best separation seen (a pytree; lives in the method state).

  Attributes:
    bank: `fifo.ClassBank` with field 'feature' `[C, L, D]`.
    best: `[]` float32, the lowest Separ a gated move has left (2 C^2 before any).
  """
  bank: fifo.ClassBank
  best: jax.Array  # [] float32


def init_gated(num_classes: int, capacity: int = 2000, dim: int = 256,
               dtype: jnp.dtype = jnp.float32) -> GatedBank:
  """An empty bank with `best = 2 C^2` (candidate code: `best_ratio = 2 * C * C`)."""
  return GatedBank(bank=init(num_classes, capacity, dim, dtype),
                   best=jnp.asarray(2.0 * num_classes * num_classes, jnp.float32))


def gated_update(state: GatedBank, anchors: jax.typing.ArrayLike,
                 anchor_labels: jax.typing.ArrayLike, anchor_valid: jax.typing.ArrayLike,
                 items: jax.typing.ArrayLike, items_valid: jax.typing.ArrayLike, *,
                 consistency: bool = True, gate: bool = True, normalize_mean: bool = False,
                 consistency_tolerance: Optional[float] = None,
                 consistency_improve: bool = True, enqueue_tolerance: Optional[float] = 1.0,
                 enqueue_improve: bool = True, offset: Optional[float] = None,
                 axis_name: Optional[str] = None) -> Tuple[GatedBank, dict]:
  """One bank step of Algorithm 1: gated consistency update, then gated enqueue.

    B_tmp = f_cons(B_t);  B_t+1 = B_tmp if gate(Separ(B_tmp), Separ(B_t)) else B_t
    B_tmp = f_que(B_t+1); B_t+2 = B_tmp if gate(Separ(B_tmp), Separ(B_t+1)) else B_t+1

  As in the candidate code: the consistency move runs only on a complete bank; an enqueue
  that leaves some class empty is kept ungated; `best` = min(best, Separ of each gated move's
  result). With `gate=False` every move is kept (the "module off" ablation keeps the
  enqueue and drops the consistency move with `consistency=False`).

  Args:
    state: the bank and best separation.
    anchors: `[N, D]` features for the consistency update (the code: the sampled anchors).
    anchor_labels: `[N]` int; anchor_valid: `[N]` bool.
    items, items_valid: `enqueue_items`' output `[B, C, P, D]`, `[B, C, P]`.
    consistency: run f_cons.
    gate: apply the separation gate.
    normalize_mean: see `consistency_update`.
    consistency_tolerance, consistency_improve: `gate_accepts` for f_cons (code: None, True).
    enqueue_tolerance, enqueue_improve: `gate_accepts` for f_que (code: 1.0, True).
    offset: V of `separation`.
    axis_name: inside `pmap`/`shard_map`: anchors and items are this device's shards.

  Returns:
    `(state, aux)`: aux holds float32 scalars `consistency_tried`, `consistency_accepted`,
    `enqueue_tried` (the gate was consulted), `enqueue_accepted`, `separation` (of the new
    bank, valid if `complete`), `complete`.
  """
  bank, best = state.bank, state.best
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  aux = {"consistency_tried": f32(0.0), "consistency_accepted": f32(0.0)}
  if consistency:
    complete = is_complete(bank)
    cand, _ = consistency_update(bank, anchors, anchor_labels, anchor_valid,
                                 normalize_mean=normalize_mean, axis_name=axis_name)
    s_old, s_new = separation(bank, offset=offset), separation(cand, offset=offset)
    if gate:
      ok = gate_accepts(s_new, s_old, best, tolerance=consistency_tolerance,
                        improve=consistency_improve)
    else:
      ok = jnp.ones((), bool)
    ok &= complete
    bank = jax.tree.map(lambda a, b: jnp.where(ok, a, b), cand, bank)
    best = jnp.where(complete, jnp.minimum(best, jnp.where(ok, s_new, s_old)), best)
    aux = {"consistency_tried": f32(complete), "consistency_accepted": f32(ok)}
  cand = enqueue(bank, items, items_valid, axis_name=axis_name)
  old_complete, new_complete = is_complete(bank), is_complete(cand)
  s_old = jnp.where(old_complete, separation(bank, offset=offset), jnp.inf)
  s_new = separation(cand, offset=offset)
  if gate:
    ok = gate_accepts(s_new, s_old, best, tolerance=enqueue_tolerance, improve=enqueue_improve)
    ok = (ok & jnp.all(cand.count >= bank.count)) | ~new_complete
  else:
    ok = jnp.ones((), bool)
  bank = jax.tree.map(lambda a, b: jnp.where(ok, a, b), cand, bank)
  best = jnp.where(new_complete, jnp.minimum(best, jnp.where(ok, s_new, s_old)), best)
  aux.update(enqueue_tried=f32(new_complete & gate), enqueue_accepted=f32(ok & new_complete),
             separation=separation(bank, offset=offset), complete=f32(is_complete(bank)))
  return GatedBank(bank=bank, best=best), aux
