"""Multi-scale k-nearest-neighbour feature density (DGCL, Wang et al., CVPR 2023, eqs. 7-8).

For a query feature v and a bank P of features of the same class, both L2-normalised,

  d_k(v) = (1/k) sum_{v' in N_k(v)} v^T v' / (||v|| ||v'||)      (eq. 7)
  d(v)   = (1/n) sum_{i=1..n} d_{k_i}(v)                          (eq. 8)

where N_k(v) are the k bank entries most similar to v (cosine). DGCL uses ks = (8, 16, 32);
the neighbours come from the bank only (v itself is never in the bank), as in the official
`dist_based_density_cal_multi_scale` with `norm=True, mode='dot'`.

Partially filled banks (defined here, not in the paper): with n_valid valid entries, d_k
averages the min(k, n_valid) most similar valid entries; it is 0 when the bank is empty.

Memory and speed: the valid queries are packed to the front (a stable sort of the validity
mask; DGCL's candidates already are a prefix) and only they are computed, in chunks of
`chunk_size` rows in a loop whose trip count is the number of valid queries over the chunk
size (a `while` loop), so a class with n valid queries costs ceil(n / chunk_size) chunks and
an absent class nothing; the largest temporary is `[chunk_size, K]` similarities (f32)
plus the `[chunk_size, max(ks)]` top-k, whatever the number of queries; with `query_index`
the queries are gathered from a pixel pool chunk by chunk, so `[C, M, D]` candidate
features are never built either. The default chunk of 256 rows wastes at most 255 rows per
class and keeps the `[256, 10,000]` similarity block in cache (issue 17: at the official
DGCL scale, 1024-row chunks computed ~13 % padding rows and ran ~1.4x slower per row on the
CPU). Matmul inputs may be cast to `compute_dtype` (e.g. bfloat16 on accelerators) with
float32 accumulation; the top-k and averages are float32. Density is a selection
criterion: no gradient flows through it.
"""

from typing import Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
from jax import lax

from semijax import ops
from semijax.banks import fifo

DEFAULT_KS = (8, 16, 32)
DEFAULT_CHUNK = 256


def _check_ks(ks: Sequence[int]) -> Tuple[int, ...]:
  ks = tuple(int(k) for k in ks)
  if not ks or min(ks) < 1:
    raise ValueError(f"ks must be positive, got {ks}")
  return ks


def _density_from_top(top: jax.Array, n_valid: jax.Array, ks: Tuple[int, ...]) -> jax.Array:
  """Eq. 8 from the sorted top similarities `[m, kmax]` and the bank's valid count."""
  kmax = top.shape[-1]
  pos = jnp.arange(kmax, dtype=jnp.int32)
  top = jnp.where(pos < n_valid, top, 0.0)  # invalid slots hold -inf; zero them
  csum = jnp.cumsum(top, axis=-1)
  total = jnp.zeros(top.shape[:-1], jnp.float32)
  for k in ks:
    k_eff = jnp.minimum(jnp.minimum(k, kmax), n_valid)  # kmax = min(max(ks), K)
    s = jnp.take(csum, jnp.maximum(k_eff - 1, 0), axis=-1)
    total = total + jnp.where(k_eff > 0, s / jnp.maximum(k_eff, 1).astype(jnp.float32), 0.0)
  return total / len(ks)


def _zero_like_inputs(*arrays: jax.Array) -> jax.Array:
  """A float32 scalar 0 typed like every input: under `shard_map` a loop carry must hold the
  union of its inputs' varying axes, which `zeros_like` propagates."""
  return sum(jnp.zeros_like(jnp.reshape(a, (-1,))[0], jnp.float32) for a in arrays)


def _prefix_density(pool: jax.Array, rows: jax.Array, count: jax.Array, bank: jax.Array,
                    bank_valid: jax.Array, *, ks: Tuple[int, ...], chunk: int, dtype,
                    normalize: bool) -> jax.Array:
  """Density of pool rows `rows[:count]` against one (already normalised, cast) bank.

  Args:
    pool: `[N, D]` raw query features.
    rows: `[M]` int32 pool rows; only the first `count` are computed.
    count: int32 scalar (traced), at most M.
    bank: `[K, D]` in the compute dtype (normalised when `normalize`).
    bank_valid: `[K]` bool.

  Returns:
    `[M]` float32, 0 from `count` on.
  """
  m = rows.shape[0]
  num_chunks = -(-m // chunk)
  rows = jnp.pad(rows, (0, num_chunks * chunk - m))
  n_valid = jnp.sum(bank_valid, dtype=jnp.int32)
  kmax = min(max(ks), bank.shape[0])

  def body(i, out):
    qc = jnp.take(pool, lax.dynamic_slice_in_dim(rows, i * chunk, chunk), axis=0)
    if normalize:
      qc = ops.l2_normalize(qc)
    sims = lax.dot_general(qc.astype(dtype), bank, (((1,), (1,)), ((), ())),
                           preferred_element_type=jnp.float32)  # [chunk, K]
    # Cosines are finite, so valid entries always rank before the -inf of invalid slots.
    top, _ = lax.top_k(jnp.where(bank_valid[None, :], sims, -jnp.inf), kmax)
    return lax.dynamic_update_slice_in_dim(out, _density_from_top(top, n_valid, ks),
                                           i * chunk, axis=0)

  zero = _zero_like_inputs(pool, rows, count, bank, bank_valid)
  out = jnp.zeros((num_chunks * chunk,), jnp.float32) + zero
  out = lax.fori_loop(0, (count + chunk - 1) // chunk, body, out)[:m]
  return jnp.where(jnp.arange(m) < count, out, 0.0)


def _packed(query_valid: jax.Array, rows: jax.Array) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Valid rows first (stable): `(order, packed rows, count)`; `order[j]` = original slot."""
  m = query_valid.shape[0]
  _, order = lax.sort((~query_valid, jnp.arange(m, dtype=jnp.int32)), num_keys=1)
  return order, jnp.take(rows, order), jnp.sum(query_valid, dtype=jnp.int32)


def _one_bank_density(pool, rows, query_valid, bank, bank_valid, *, ks, chunk, dtype,
                      normalize):
  """`[M]` densities of the valid `rows` of `pool` against one raw bank `[K, D]`."""
  order, packed, count = _packed(query_valid, rows)

  def compute(bank):
    b = ops.l2_normalize(bank) if normalize else bank
    return _prefix_density(pool, packed, count, b.astype(dtype), bank_valid, ks=ks,
                           chunk=chunk, dtype=dtype, normalize=normalize)

  def skip(bank):
    return (jnp.zeros(packed.shape, jnp.float32)
            + _zero_like_inputs(pool, packed, count, bank, bank_valid))

  dens = lax.cond(count > 0, compute, skip, bank)
  return jnp.zeros_like(dens).at[order].set(dens)


def knn_density(queries: jax.typing.ArrayLike, bank: jax.typing.ArrayLike,
                bank_valid: Optional[jax.typing.ArrayLike] = None, *,
                query_valid: Optional[jax.typing.ArrayLike] = None,
                query_index: Optional[jax.typing.ArrayLike] = None,
                ks: Sequence[int] = DEFAULT_KS, chunk_size: int = DEFAULT_CHUNK,
                compute_dtype: Optional[jnp.dtype] = None,
                normalize: bool = True) -> jax.Array:
  """Multi-scale kNN density of each query against one bank (eqs. 7-8).

  Args:
    queries: `[M, D]` features (any float dtype, raw: normalised here); or, with
      `query_index`, a pool `[N, D]` from which the M queries are gathered chunk by chunk
      (so `[M, D]` is never materialised).
    bank: `[K, D]` features of the same class.
    bank_valid: optional `[K]` bool, the filled slots (default all).
    query_valid: optional `[M]` bool; invalid queries get 0 and are not computed.
    query_index: optional `[M]` int rows of the pool `queries`.
    ks: neighbourhood sizes k_1 < ... < k_n (DGCL: 8, 16, 32).
    chunk_size: queries per loop step; bounds memory at `[chunk_size, K]`.
    compute_dtype: optional matmul input dtype (e.g. `jnp.bfloat16`); accumulation is f32.
    normalize: L2-normalise queries and bank (cosine similarity). False means the inputs
      are already normalised (or a dot-product density is wanted).

  Returns:
    `[M]` float32 densities in `[-1, 1]`; d_k averages the min(k, n_valid) nearest valid
    entries, and the density is 0 when no bank entry is valid.
  """
  ks = _check_ks(ks)
  queries = lax.stop_gradient(jnp.asarray(queries))
  bank = lax.stop_gradient(jnp.asarray(bank))
  d = queries.shape[1]
  m = queries.shape[0] if query_index is None else jnp.shape(query_index)[0]
  k_slots = bank.shape[0]
  if bank.shape[1] != d:
    raise ValueError(f"queries [.., {d}] and bank {bank.shape} differ in D")
  bank_valid = (jnp.ones((k_slots,), bool) if bank_valid is None
                else jnp.asarray(bank_valid, bool))
  query_valid = (jnp.ones((m,), bool) if query_valid is None
                 else jnp.asarray(query_valid, bool))
  rows = (jnp.arange(m, dtype=jnp.int32) if query_index is None
          else jnp.asarray(query_index, jnp.int32))
  chunk = max(1, min(int(chunk_size), m))
  return _one_bank_density(queries, rows, query_valid, bank, bank_valid, ks=ks, chunk=chunk,
                           dtype=jnp.float32 if compute_dtype is None else compute_dtype,
                           normalize=normalize)


def class_density(queries: jax.typing.ArrayLike, query_valid: jax.typing.ArrayLike,
                  bank: Union[fifo.ClassBank, jax.typing.ArrayLike],
                  bank_valid: Optional[jax.typing.ArrayLike] = None, *,
                  query_index: Optional[jax.typing.ArrayLike] = None,
                  field: str = "feature", ks: Sequence[int] = DEFAULT_KS,
                  chunk_size: int = DEFAULT_CHUNK, compute_dtype: Optional[jnp.dtype] = None,
                  normalize: bool = True) -> jax.Array:
  """Class-wise density: queries of class c against bank c, for every class.

  Classes are processed one after the other (`lax.map`), each in chunks of its valid queries
  only (a class without valid queries skips its bank), so memory is `[chunk_size, K]`
  whatever C and M are.

  Args:
    queries: `[C, M, D]` features, row c holding candidates of class c; or, with
      `query_index`, a pool `[N, D]` shared by all classes.
    query_valid: `[C, M]` bool.
    bank: a `ClassBank` (field `field` is used, its fill gives the validity) or a `[C, K, D]`
      array with `bank_valid`.
    bank_valid: `[C, K]` bool when `bank` is an array (default all valid).
    query_index: optional `[C, M]` int rows of the pool (gathered chunk by chunk, so
      `[C, M, D]` is never built).
    field: bank field holding the features.
    ks, chunk_size, compute_dtype, normalize: as `knn_density`.

  Returns:
    `[C, M]` float32 densities (0 at invalid queries and for classes with an empty bank).
  """
  if isinstance(bank, fifo.ClassBank):
    if bank_valid is not None:
      raise ValueError("bank_valid comes from the ClassBank's count")
    entries, bank_valid = fifo.read(bank)
    bank = entries[field]
  ks = _check_ks(ks)
  bank = lax.stop_gradient(jnp.asarray(bank))
  if bank_valid is None:
    bank_valid = jnp.ones(bank.shape[:2], bool)
  query_valid = jnp.asarray(query_valid, bool)
  bank_valid = jnp.asarray(bank_valid, bool)
  queries = lax.stop_gradient(jnp.asarray(queries))
  dtype = jnp.float32 if compute_dtype is None else compute_dtype
  m = query_valid.shape[1]
  chunk = max(1, min(int(chunk_size), m))
  kw = dict(ks=ks, chunk=chunk, dtype=dtype, normalize=normalize)

  if query_index is None:   # a [C, M, D] block: class c's pool is its own row
    d = queries.shape[-1]
    return lax.map(lambda a: _one_bank_density(
        a[0], jnp.arange(m, dtype=jnp.int32), a[1], a[2], a[3], **kw),
                   (queries.reshape(-1, m, d), query_valid, bank, bank_valid))
  return lax.map(lambda a: _one_bank_density(queries, a[0], a[1], a[2], a[3], **kw),
                 (jnp.asarray(query_index, jnp.int32), query_valid, bank, bank_valid))
