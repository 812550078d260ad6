"""Class-wise FIFO memory bank: a pytree of per-class ring buffers and pure functions on it.

One `ClassBank` holds, for each of C classes, up to K items, each item being a record of named
fields (e.g. DGCL: `feature` [256], `projection` [256], `density` []; Alonso et al.: one
projection; CSC: pixel features and region means). Every field is a `[C, K, ...]` array, so the
whole bank is a fixed-shape pytree that lives in the train state, is donated and checkpointed,
and is replicated (`P()`) over a data mesh.

Write order is FIFO per class: a push writes its items to slots `(ptr + rank) % K`, so once a
class is full the newest items replace the oldest ones. `read` returns the raw slots (valid
slots are `[0, count)`); `read_newest_first` returns them by age, the layout of the PyTorch
reference banks (new items prepended, the list truncated to K).

Memory: a push never materialises `N x C` or `N x C x K` arrays. The per-class random subset
is one `O(N log N)` sort of `(label, random bits)` pairs; the items chosen are gathered into
`[C, P, ...]` (P = `push_per_class`) and scattered into the bank with `mode='drop'`.

A bank can also be built from given contents (`from_entries`), e.g. a test fixture or a bank
restored from another codebase, and inspected with `read`.
"""

import dataclasses
from typing import Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from semijax import _deprecation, collectives

Spec = Mapping[str, Tuple[Sequence[int], jnp.dtype]]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ClassBank:
  """Per-class FIFO ring buffers of named fields (a pytree; all leaves are arrays).

  Attributes:
    entries: field name -> `[C, K, ...]` array (any dtype). Slot `k` of class `c` holds a
      valid item iff `k < count[c]`.
    ptr: `[C]` int32, next slot to write per class; equals `count` until the class is full,
      then points at the oldest item.
    count: `[C]` int32, number of valid items per class (`<= K`).
  """
  entries: Dict[str, jax.Array]  # name -> [C, K, ...], field dtype
  ptr: jax.Array  # [C] int32
  count: jax.Array  # [C] int32

  @property
  def num_classes(self) -> int:
    """C (static)."""
    return self.ptr.shape[0]

  @property
  def capacity(self) -> int:
    """K, the number of slots per class (static)."""
    return next(iter(self.entries.values())).shape[1]


def init(num_classes: int, capacity: int, spec: Spec) -> ClassBank:
  """An empty bank.

  Args:
    num_classes: C.
    capacity: K, items kept per class.
    spec: field name -> `(trailing shape, dtype)`, e.g.
      `{'feature': ((256,), jnp.float32), 'density': ((), jnp.float32)}`.

  Returns:
    `ClassBank` with zero entries, `ptr = count = 0`.
  """
  if not spec:
    raise ValueError("spec must name at least one field")
  entries = {name: jnp.zeros((num_classes, capacity, *tuple(shape)), dtype)
             for name, (shape, dtype) in spec.items()}
  zeros = jnp.zeros((num_classes,), jnp.int32)
  return ClassBank(entries=entries, ptr=zeros, count=zeros)


def from_entries(entries: Mapping[str, jax.typing.ArrayLike],
                 count: Optional[jax.typing.ArrayLike] = None, *,
                 ptr: Optional[jax.typing.ArrayLike] = None) -> ClassBank:
  """A bank holding given contents, e.g. a test fixture or a bank from another codebase.

  `read(from_entries(entries, count))` gives back `entries` (slots at or past `count` zeroed)
  and the validity `arange(K) < count`.

  Args:
    entries: field name -> `[C, K, ...]` array (stored with its dtype). Slots `[0, count[c])`
      of class c are its items, in ring-buffer order.
    count: `[C]` int, items per class in `[0, K]` (default K: every class full).
    ptr: `[C]` int, the next slot to write (default `count % K`: right after the last item of
      a partly filled class, the oldest (slot 0) of a full one, which is what pushes into an
      empty bank leave as long as no class wrapped around).

  Returns:
    `ClassBank`.

  Raises:
    ValueError: no field, fields whose leading `[C, K]` differ, or (when `count` is concrete)
      counts that are not `[C]` ints in `[0, K]`.
  """
  if not entries:
    raise ValueError("entries must name at least one field")
  entries = {name: jnp.asarray(value) for name, value in entries.items()}
  shapes = {name: tuple(value.shape) for name, value in entries.items()}
  if (any(len(shape) < 2 for shape in shapes.values())
      or len({shape[:2] for shape in shapes.values()}) != 1):
    raise ValueError(f"every field must be [C, K, ...] with one C and K, got {shapes}")
  c, k = next(iter(shapes.values()))[:2]
  if count is None:
    count = np.full((c,), k, np.int32)
  try:   # concrete counts are checked (traced ones, under jit, cannot be)
    count_np = np.asarray(count)
  except jax.errors.TracerArrayConversionError:
    count_np = None
  if count_np is not None and (
      count_np.shape != (c,) or not np.issubdtype(count_np.dtype, np.integer)
      or count_np.min(initial=0) < 0 or count_np.max(initial=0) > k):
    raise ValueError(f"count must be [C={c}] ints in [0, {k}], got {count_np!r}")
  count = jnp.asarray(count, jnp.int32)
  ptr = count % k if ptr is None else jnp.asarray(ptr, jnp.int32)
  slot_valid = jnp.arange(k, dtype=jnp.int32)[None, :] < count[:, None]   # [C, K]
  stored = {name: jnp.where(slot_valid.reshape(slot_valid.shape + (1,) * (value.ndim - 2)),
                            value, jnp.zeros((), value.dtype))
            for name, value in entries.items()}
  return ClassBank(entries=stored, ptr=ptr, count=count)


def read(bank: ClassBank) -> Tuple[Dict[str, jax.Array], jax.Array]:
  """The raw slots and their validity.

  Returns:
    `(entries, valid)`: field name -> `[C, K, ...]`, and `valid` `[C, K]` bool. Slot order is
    the ring-buffer order (not age order; see `read_newest_first`).
  """
  valid = jnp.arange(bank.capacity, dtype=jnp.int32)[None, :] < bank.count[:, None]
  return dict(bank.entries), valid


def read_newest_first(bank: ClassBank) -> Tuple[Dict[str, jax.Array], jax.Array]:
  """The slots by age: position 0 is the most recently written item of each class.

  This is the layout of the PyTorch banks (DGCL's `FeatureMemory`, Alonso et al.'s
  `FeatureMemory`), which prepend new items and truncate to K. Within one push, items are
  ordered newest-last in write order, so the last item written is at position 0.

  Returns:
    `(entries, valid)`: field name -> `[C, K, ...]`, `valid` `[C, K]` bool (a prefix).
  """
  k = bank.capacity
  age = jnp.arange(k, dtype=jnp.int32)
  slots = (bank.ptr[:, None] - 1 - age[None, :]) % k  # [C, K]
  entries = {}
  for name, value in bank.entries.items():
    idx = slots.reshape(slots.shape + (1,) * (value.ndim - 2))
    entries[name] = jnp.take_along_axis(value, idx, axis=1)
  valid = age[None, :] < bank.count[:, None]
  return entries, valid


def is_full(bank: ClassBank) -> jax.Array:
  """Scalar bool: every class holds K items (DGCL's `check_if_full`)."""
  return jnp.all(bank.count >= bank.capacity)


def class_is_full(bank: ClassBank) -> jax.Array:
  """`[C]` bool: which classes hold K items."""
  return bank.count >= bank.capacity


def select_per_class(labels: jax.typing.ArrayLike, valid: jax.typing.ArrayLike,
                     rng: Optional[jax.Array], *, num_classes: int, max_per_class: int,
                     scores: Optional[jax.typing.ArrayLike] = None
                     ) -> Tuple[jax.Array, jax.Array]:
  """For every class, at most `max_per_class` of its valid items, without replacement.

  By default the subset is uniform at random (as `np.random.choice(n, P, replace=False)`);
  with `scores`, it is the `max_per_class` highest-scoring items of each class (ties by index).
  Implemented as one sort of `(class, -score or random 32-bit key, index)`, so its cost is
  `O(N log N)` and it never builds an `N x C` array.

  Args:
    labels: `[N]` int class per item; values outside `[0, C)` (e.g. 255) are never chosen.
    valid: `[N]` bool candidates.
    rng: PRNG key (unused when `scores` is given; may then be None).
    num_classes: C.
    max_per_class: P, static.
    scores: optional `[N]` float; choose by score instead of at random.

  Returns:
    indices `[C, P]` int32 into the N items and valid `[C, P]` bool. The valid slots of each
    row form a prefix, in random order (or descending score); a class with `n_c <= P` items
    gets all of them.
  """
  labels = jnp.asarray(labels, jnp.int32).reshape(-1)
  valid = jnp.asarray(valid, bool).reshape(-1)
  n = labels.shape[0]
  in_range = valid & (labels >= 0) & (labels < num_classes)
  cls = jnp.where(in_range, labels, num_classes)
  if scores is None:
    # 32 random bits: far fewer ties than uniform floats (23 bits) at N ~ 1e6.
    key = jax.random.bits(rng, (n,), jnp.uint32)
  else:
    # Descending score: sort ascending on the negated value (order-preserving on floats).
    key = -jnp.asarray(scores, jnp.float32).reshape(-1)
  iota = jnp.arange(n, dtype=jnp.int32)
  _, _, perm = lax.sort((cls, key, iota), num_keys=2)
  counts = jnp.zeros((num_classes + 1,), jnp.int32).at[cls].add(1)[:num_classes]
  starts = jnp.cumsum(counts) - counts
  j = jnp.arange(max_per_class, dtype=jnp.int32)
  pos = jnp.minimum(starts[:, None] + j[None, :], n - 1)
  sel_valid = j[None, :] < counts[:, None]
  indices = jnp.where(sel_valid, perm[pos], 0)
  return indices, sel_valid


def write(bank: ClassBank, entries: Mapping[str, jax.typing.ArrayLike],
          valid: jax.typing.ArrayLike) -> ClassBank:
  """Writes per-class items into the ring buffers, FIFO.

  The valid items of row c are written in row order to slots `(ptr[c] + rank) % K`, rank
  counting valid items only. If a row holds more than K valid items only its last K survive,
  exactly as sequential writes would leave them. Invalid items go to an out-of-range row and
  are dropped by the scatter.

  Args:
    bank: the bank.
    entries: every field of the bank -> `[C, P, ...]` (cast to the field's dtype; treated as
      constants: gradients are stopped).
    valid: `[C, P]` bool.

  Returns:
    The updated bank (`ptr += n_c mod K`, `count = min(count + n_c, K)`).
  """
  if set(entries) != set(bank.entries):
    raise ValueError(f"fields {sorted(entries)} do not match the bank's "
                     f"{sorted(bank.entries)}")
  c, k = bank.num_classes, bank.capacity
  valid = jnp.asarray(valid, bool)
  if valid.ndim != 2 or valid.shape[0] != c:
    raise ValueError(f"valid must be [C={c}, P], got {valid.shape}")
  rank = jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1  # [C, P]
  n_new = jnp.sum(valid, axis=1, dtype=jnp.int32)  # [C]
  keep = valid & (rank >= (n_new - k)[:, None])
  rows = jnp.where(keep, jnp.arange(c, dtype=jnp.int32)[:, None], c)  # c = dropped
  slots = (bank.ptr[:, None] + rank) % k
  new_entries = {}
  for name, value in bank.entries.items():
    item = lax.stop_gradient(jnp.asarray(entries[name])).astype(value.dtype)
    if item.shape[:2] != valid.shape or item.shape[2:] != value.shape[2:]:
      raise ValueError(f"field {name!r}: expected [C, P]+{value.shape[2:]} with "
                       f"[C, P]={valid.shape}, got {item.shape}")
    new_entries[name] = value.at[rows, slots].set(item, mode="drop")
  return ClassBank(entries=new_entries,
                   ptr=(bank.ptr + n_new) % k,
                   count=jnp.minimum(bank.count + n_new, k))


@_deprecation.renamed_args({"max_per_class": "push_per_class"})
def push(bank: ClassBank, entries: Mapping[str, jax.typing.ArrayLike],
         labels: jax.typing.ArrayLike, valid: jax.typing.ArrayLike, rng: Optional[jax.Array],
         *, push_per_class: int, scores: Optional[jax.typing.ArrayLike] = None,
         axis_name: Optional[str] = None) -> ClassBank:
  """Adds at most `push_per_class` items of each class, chosen at random, FIFO.

  `select_per_class` followed by `write`. With `axis_name` (inside `pmap`/`shard_map`),
  items, labels and validity are all-gathered first (as constants) and the key is device 0's
  (`collectives.same_rng`), so every device pushes the same items and banks stay identical.

  Args:
    bank: the bank.
    entries: every field of the bank -> `[N, ...]` items (no gradient flows into the bank).
    labels: `[N]` int class per item (values outside `[0, C)`, e.g. 255, are skipped).
    valid: `[N]` bool, True on the items that may be pushed.
    rng: PRNG key for the random subset (may be None with `scores`).
    push_per_class: P, the most items a class gains per push (DGCL: 1000). Must be `<= K`.
      Deprecated alias: `max_per_class`.
    scores: optional `[N]` float; keep the highest-scoring items instead (Alonso et al. keep
      the lowest: pass the negated score).
    axis_name: mapped axis, or None when the inputs are the global batch.

  Returns:
    The updated bank.
  """
  if push_per_class > bank.capacity:
    raise ValueError(f"push_per_class={push_per_class} exceeds capacity={bank.capacity}")
  entries = {name: collectives.all_gather(jnp.asarray(v), axis_name, differentiable=False)
             for name, v in entries.items()}
  labels = collectives.all_gather(jnp.asarray(labels).reshape(-1), axis_name,
                                  differentiable=False)
  valid = collectives.all_gather(jnp.asarray(valid).reshape(-1), axis_name,
                                 differentiable=False)
  if scores is not None:
    scores = collectives.all_gather(jnp.asarray(scores).reshape(-1), axis_name,
                                    differentiable=False)
  if rng is not None:
    rng = collectives.same_rng(rng, axis_name)
  idx, sel_valid = select_per_class(labels, valid, rng, num_classes=bank.num_classes,
                                    max_per_class=push_per_class, scores=scores)
  per_class = {name: jnp.take(v, idx, axis=0) for name, v in entries.items()}
  return write(bank, per_class, sel_valid)


def gather(bank: ClassBank, name: str, indices: jax.typing.ArrayLike) -> jax.Array:
  """`bank.entries[name][c, indices[c, j]]` for every class: `[C, J]` -> `[C, J, ...]`."""
  value = bank.entries[name]
  indices = jnp.asarray(indices, jnp.int32)
  idx = indices.reshape(indices.shape + (1,) * (value.ndim - 2))
  return jnp.take_along_axis(value, idx, axis=1)


def nbytes(num_classes: int, capacity: int, spec: Spec) -> int:
  """Memory of a bank with this spec, in bytes (for sizing; no arrays built)."""
  return int(sum(num_classes * capacity * int(np.prod(shape, dtype=np.int64)) *
                 jnp.dtype(dtype).itemsize for shape, dtype in spec.values()))
