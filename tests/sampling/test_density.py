"""Multi-scale kNN density (DGCL eqs. 7-8) against a brute-force NumPy reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semijax.banks import fifo
from semijax.sampling import density
from tests.references import np_density

pytestmark = pytest.mark.usefixtures("fast_compiles")


_knn = jax.jit(density.knn_density,
               static_argnames=("ks", "chunk_size", "compute_dtype", "normalize"))


@pytest.mark.parametrize("n_valid", [40, 11, 3, 0])
def test_knn_density_matches_brute_force(n_valid):
  rng = np.random.default_rng(n_valid)
  q = rng.normal(size=(37, 6)).astype(np.float32)
  bank = rng.normal(size=(40, 6)).astype(np.float32) * 3.0
  valid = np.zeros(40, bool)
  valid[rng.permutation(40)[:n_valid]] = True  # scattered, not a prefix
  ks = (2, 4, 8)
  got = _knn(q, bank, valid, ks=ks, chunk_size=8)  # 37 = 4 chunks of 8 + padding
  np.testing.assert_allclose(got, np_density(q, bank, valid, ks), rtol=1e-5, atol=1e-6)
  if n_valid == 0:
    np.testing.assert_array_equal(got, 0.0)


def test_knn_density_chunking_query_valid_and_small_bank():
  rng = np.random.default_rng(1)
  q = rng.normal(size=(20, 5)).astype(np.float32)
  bank = rng.normal(size=(6, 5)).astype(np.float32)  # K < max(ks): k is capped at K
  ks = (2, 8, 16)
  ones = np.ones(6, bool)
  a = _knn(q, bank, ones, ks=ks, chunk_size=3)
  b = _knn(q, bank, ones, ks=ks, chunk_size=1024)
  np.testing.assert_allclose(a, b, rtol=1e-6)
  np.testing.assert_allclose(a, np_density(q, bank, ones, ks), rtol=1e-5)
  qv = np.arange(20) % 3 == 0
  c = density.knn_density(q, bank, ones, query_valid=qv, ks=ks, chunk_size=4)
  np.testing.assert_allclose(c, np.where(qv, a, 0.0), rtol=1e-6)


def test_knn_density_bf16_compute_is_close():
  rng = np.random.default_rng(2)
  q = rng.normal(size=(16, 32)).astype(np.float32)
  bank = rng.normal(size=(64, 32)).astype(np.float32)
  got = _knn(q, bank, np.ones(64, bool), ks=(8, 16, 32), chunk_size=16,
             compute_dtype=jnp.bfloat16)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, np_density(q, bank, np.ones(64, bool), (8, 16, 32)),
                             atol=2e-2)


def test_class_density_with_class_bank():
  rng = np.random.default_rng(3)
  c, k, m, d = 3, 12, 9, 4
  bank = fifo.init(c, k, {"feature": ((d,), jnp.float32)})
  feats = rng.normal(size=(c, k, d)).astype(np.float32)
  fill = np.zeros((c, k), bool)
  fill[0, :12] = True
  fill[1, :5] = True  # partially filled; class 2 empty
  bank = fifo.write(bank, {"feature": feats}, fill)
  queries = rng.normal(size=(c, m, d)).astype(np.float32)
  qv = rng.random((c, m)) < 0.7
  ks = (2, 4, 8)
  got = jax.jit(functools.partial(density.class_density, ks=ks, chunk_size=4))(
      queries, qv, bank)
  for cls in range(c):
    ref = np.where(qv[cls], np_density(queries[cls], feats[cls], fill[cls], ks), 0.0)
    np.testing.assert_allclose(got[cls], ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got[2], 0.0)
  # The array form, and queries gathered from a pool by index, give the same.
  arr = density.class_density(queries, qv, feats, fill, ks=ks, chunk_size=4)
  np.testing.assert_allclose(arr, got, rtol=1e-6)
  perm = rng.permutation(c * m)
  pool = queries.reshape(c * m, d)[np.argsort(perm)]  # pool[perm[i]] = queries.flat[i]
  pooled = density.class_density(pool, qv, bank, query_index=perm.reshape(c, m), ks=ks,
                                 chunk_size=4)
  np.testing.assert_allclose(pooled, got, rtol=1e-6)


def test_density_has_no_gradient():
  rng = np.random.default_rng(4)
  q = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
  bank = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
  g = jax.grad(lambda q: jnp.sum(density.knn_density(q, bank, ks=(2,))))(q)
  np.testing.assert_array_equal(g, 0.0)
