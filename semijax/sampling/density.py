"""Multi-scale k-nearest-neighbour feature density (DGCL, Wang et al., CVPR 2023, eqs. 7-8).

For a query feature v and a bank P of features of the same class, both L2-normalised,

  d_k(v) = (1/k) sum_{v' in N_k(v)} v^T v' / (||v|| ||v'||)      (eq. 7)
  d(v)   = (1/n) sum_{i=1..n} d_{k_i}(v)                          (eq. 8)

where N_k(v) are the k bank entries most similar to v (cosine). DGCL uses ks = (8, 16, 32);
the neighbours come from the bank only (v itself is never in the bank), as in the official
`dist_based_density_cal_multi_scale` with `norm=True, mode='dot'`.

Partially filled banks (defined here, not in the paper): with n_valid valid entries, d_k
averages the min(k, n_valid) most similar valid entries; it is 0 when the bank is empty.

Memory and speed: queries are processed in chunks of `chunk_size` with `lax.map`, so the
largest temporary is `[chunk_size, K]` similarities (f32) plus the `[chunk_size, max(ks)]`
top-k, whatever the number of queries; with `query_index` the queries are gathered from a
pixel pool chunk by chunk, so `[C, M, D]` candidate features are never built either. A
chunk whose queries are all invalid is skipped with `lax.cond` (classes absent from a batch
cost nothing but the loop step). Matmul inputs may be cast to `compute_dtype` (e.g.
bfloat16 on accelerators) with float32 accumulation; the top-k and averages are float32.
Density is a selection criterion: no gradient flows through it.
"""

from typing import Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
from jax import lax

from semijax import ops
from semijax.banks import fifo

DEFAULT_KS = (8, 16, 32)


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


def knn_density(queries: jax.typing.ArrayLike, bank: jax.typing.ArrayLike,
                bank_valid: Optional[jax.typing.ArrayLike] = None, *,
                query_valid: Optional[jax.typing.ArrayLike] = None,
                query_index: Optional[jax.typing.ArrayLike] = None,
                ks: Sequence[int] = DEFAULT_KS, chunk_size: int = 1024,
                compute_dtype: Optional[jnp.dtype] = None,
                normalize: bool = True) -> jax.Array:
  """Multi-scale kNN density of each query against one bank (eqs. 7-8).

  Args:
    queries: `[M, D]` features (any float dtype, raw: normalised here); or, with
      `query_index`, a pool `[N, D]` from which the M queries are gathered chunk by chunk
      (so `[M, D]` is never materialised).
    bank: `[K, D]` features of the same class.
    bank_valid: optional `[K]` bool, the filled slots (default all).
    query_valid: optional `[M]` bool; invalid queries get 0 and whole invalid chunks are
      skipped.
    query_index: optional `[M]` int rows of the pool `queries`.
    ks: neighbourhood sizes k_1 < ... < k_n (DGCL: 8, 16, 32).
    chunk_size: queries per `lax.map` step; bounds memory at `[chunk_size, K]`.
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
  dtype = jnp.float32 if compute_dtype is None else compute_dtype
  if normalize:
    bank = ops.l2_normalize(bank)
  bank = bank.astype(dtype)
  n_valid = jnp.sum(bank_valid, dtype=jnp.int32)
  kmax = min(max(ks), k_slots)

  chunk = max(1, min(int(chunk_size), m))
  num_chunks = -(-m // chunk)
  pad = num_chunks * chunk - m
  qv = jnp.pad(query_valid, (0, pad)).reshape(num_chunks, chunk)
  if query_index is None:
    rows = jnp.pad(queries, ((0, pad), (0, 0))).reshape(num_chunks, chunk, d)
  else:
    rows = jnp.pad(jnp.asarray(query_index, jnp.int32), (0, pad)).reshape(num_chunks, chunk)

  def compute(rows_c):
    qc = rows_c if query_index is None else jnp.take(queries, rows_c, axis=0)
    if normalize:
      qc = ops.l2_normalize(qc)
    sims = lax.dot_general(qc.astype(dtype), bank, (((1,), (1,)), ((), ())),
                           preferred_element_type=jnp.float32)  # [chunk, K]
    # Cosines are finite, so valid entries always rank before the -inf of invalid slots.
    top, _ = lax.top_k(jnp.where(bank_valid[None, :], sims, -jnp.inf), kmax)
    return _density_from_top(top, n_valid, ks)

  def skip(rows_c):
    # Zeros typed like `compute`'s output: under shard_map they must carry the union of the
    # inputs' varying axes, which `zeros_like` of each input propagates.
    return (jnp.zeros_like(rows_c.reshape(chunk, -1)[:, 0], jnp.float32)
            + jnp.zeros_like(queries[0, 0], jnp.float32)
            + jnp.zeros_like(bank[0, 0], jnp.float32)
            + jnp.zeros_like(n_valid, jnp.float32))

  def step(args):
    rows_c, vc = args
    dens = lax.cond(jnp.any(vc), compute, skip, rows_c)
    return jnp.where(vc, dens, 0.0)

  out = lax.map(step, (rows, qv)) if num_chunks > 1 else step((rows[0], qv[0]))[None]
  return out.reshape(-1)[:m]


def class_density(queries: jax.typing.ArrayLike, query_valid: jax.typing.ArrayLike,
                  bank: Union[fifo.ClassBank, jax.typing.ArrayLike],
                  bank_valid: Optional[jax.typing.ArrayLike] = None, *,
                  query_index: Optional[jax.typing.ArrayLike] = None,
                  field: str = "feature", ks: Sequence[int] = DEFAULT_KS,
                  chunk_size: int = 1024, compute_dtype: Optional[jnp.dtype] = None,
                  normalize: bool = True) -> jax.Array:
  """Class-wise density: queries of class c against bank c, for every class.

  Classes are processed one after the other (`lax.map`), each in query chunks, so memory is
  `[chunk_size, K]` whatever C and M are.

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
  bank = jnp.asarray(bank)
  if bank_valid is None:
    bank_valid = jnp.ones(bank.shape[:2], bool)
  kw = dict(ks=ks, chunk_size=chunk_size, compute_dtype=compute_dtype, normalize=normalize)
  query_valid = jnp.asarray(query_valid, bool)
  bank_valid = jnp.asarray(bank_valid, bool)
  queries = jnp.asarray(queries)

  if query_index is None:
    return lax.map(lambda a: knn_density(a[0], a[2], a[3], query_valid=a[1], **kw),
                   (queries, query_valid, bank, bank_valid))
  return lax.map(lambda a: knn_density(queries, a[2], a[3], query_valid=a[1],
                                       query_index=a[0], **kw),
                 (jnp.asarray(query_index, jnp.int32), query_valid, bank, bank_valid))
