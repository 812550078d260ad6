"""DGCL density-guided sampling (eqs. 9-12) and bank update against NumPy references."""

import functools

import chex
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from semijax.banks import fifo
from semijax.sampling import dgcl
from tests.references import np_density

C, K, DV, DP = 4, 16, 5, 3
KS = (2, 4, 8)
A, PB, PM, NN = 5, 3, 4, 10


pytestmark = pytest.mark.usefixtures("fast_compiles")


def make_bank(rng, fill):
  bank = dgcl.init_bank(C, K, feature_dim=DV, projection_dim=DP)
  entries = {
      dgcl.FEATURE: rng.normal(size=(C, K, DV)).astype(np.float32),
      dgcl.PROJECTION: rng.normal(size=(C, K, DP)).astype(np.float32),
      dgcl.DENSITY: rng.uniform(-1, 1, size=(C, K)).astype(np.float32),
  }
  valid = np.arange(K)[None, :] < np.asarray(fill)[:, None]
  return fifo.write(bank, entries, valid), entries, valid


def test_bank_from_entries_equals_writing_them():
  rng = np.random.default_rng(11)
  bank, entries, _ = make_bank(rng, [K, 6, 2, 0])
  built = dgcl.bank_from_entries(entries[dgcl.FEATURE], entries[dgcl.PROJECTION],
                                 entries[dgcl.DENSITY], np.array([K, 6, 2, 0]))
  chex.assert_trees_all_equal(built, bank)
  assert jax.tree.structure(built) == jax.tree.structure(dgcl.init_bank(C, K, feature_dim=DV,
                                                                         projection_dim=DP))
  full = dgcl.bank_from_entries(entries[dgcl.FEATURE], entries[dgcl.PROJECTION],
                                entries[dgcl.DENSITY])
  assert bool(fifo.is_full(full))


def make_batch(rng, n=72):
  labels = rng.integers(0, C, n)
  labels[rng.random(n) < 0.15] = 255
  labels[labels == 3] = 1  # class 3 absent from the batch
  labels[:3] = 2  # ... and class 2 tiny (3 pixels, <= max(KS))
  labels[3:][labels[3:] == 2] = 1
  feats = rng.normal(size=(n, DV)).astype(np.float32)
  return feats, labels.astype(np.int32)


_sample = jax.jit(dgcl.sample, static_argnames=(
    "num_anchors", "num_batch_keys", "num_bank_keys", "num_negatives",
    "max_per_class", "ks", "exclude_classes", "small_class_density", "chunk_size"))
KW = dict(num_anchors=A, num_batch_keys=PB, num_bank_keys=PM, num_negatives=NN, ks=KS,
          chunk_size=8)


def test_sample_matches_numpy_reference():
  rng = np.random.default_rng(0)
  bank, entries, bank_valid = make_bank(rng, [K, K, 7, K])
  feats, labels = make_batch(rng)
  sel, aux = _sample(feats, labels, bank, jax.random.key(0), max_per_class=100,
                     exclude_classes=(0,), small_class_density=None, **KW)
  sel = jax.tree.map(np.asarray, sel)
  for c in range(C):
    idx_c = np.nonzero(labels == c)[0]
    present = len(idx_c) > 0 and c != 0
    assert sel.class_valid[c] == present
    if not present:
      for v in (sel.anchor_valid, sel.batch_key_valid, sel.bank_key_valid,
                sel.negative_valid):
        assert not v[c].any()
      continue
    d = np_density(feats[idx_c], entries[dgcl.FEATURE][c], bank_valid[c], KS)
    assert np.min(np.diff(np.sort(d))) > 1e-5  # distinct: no tie ambiguity
    order = np.argsort(d)
    np.testing.assert_array_equal(sel.anchor_idx[c][sel.anchor_valid[c]], idx_c[order[:A]])
    np.testing.assert_array_equal(sel.batch_key_idx[c][sel.batch_key_valid[c]],
                                  idx_c[order[::-1][:PB]])
    slots = np.nonzero(bank_valid[c])[0]
    stored = entries[dgcl.DENSITY][c][slots]
    np.testing.assert_array_equal(sel.bank_key_idx[c][sel.bank_key_valid[c]],
                                  slots[np.argsort(-stored)[:PM]])
    neg = sel.negative_idx[c][sel.negative_valid[c]]
    others = np.nonzero((labels != c) & (labels != 255))[0]
    assert len(neg) == min(NN, len(others)) and len(set(neg)) == len(neg)
    assert set(neg) <= set(others)
  assert float(aux["num_classes"]) == 2.0  # classes 1 and 2 (0 excluded, 3 absent)


def test_small_class_rule_subsample_and_no_exclusion():
  rng = np.random.default_rng(1)
  bank, _, _ = make_bank(rng, [K] * C)
  feats, labels = make_batch(rng)
  sel, aux = _sample(feats, labels, bank, jax.random.key(1), max_per_class=4,
                     exclude_classes=(), small_class_density=1.0, **KW)
  sel = jax.tree.map(np.asarray, sel)
  assert sel.class_valid[0] and sel.class_valid[1] and sel.class_valid[2]
  # The candidate cap (4 <= max(KS)) makes every present class "small": density := 1.
  np.testing.assert_allclose(aux["anchor_density_mean"], 1.0)
  for c in (0, 1):
    a = sel.anchor_idx[c][sel.anchor_valid[c]]
    assert len(a) == 4 and len(set(a)) == 4 and np.all(labels[a] == c)
    # Batch keys come from the same 4 candidates.
    assert set(sel.batch_key_idx[c][sel.batch_key_valid[c]]) <= set(a)
  assert sorted(sel.anchor_idx[2][sel.anchor_valid[2]]) == [0, 1, 2]


def test_subsample_is_random_across_keys():
  rng = np.random.default_rng(2)
  bank, _, _ = make_bank(rng, [K] * C)
  feats, labels = make_batch(rng)
  chosen = set()
  for i in range(3):
    sel, _ = _sample(feats, labels, bank, jax.random.key(i), max_per_class=4,
                     exclude_classes=(), small_class_density=1.0, **KW)
    chosen |= set(np.asarray(sel.anchor_idx[1])[np.asarray(sel.anchor_valid[1])])
  assert len(chosen) > 4


_push = jax.jit(dgcl.push_bank, static_argnames=("push_per_class", "ks", "min_bank_size",
                                                  "chunk_size", "axis_name"))


def test_push_bank_stores_density_against_current_bank():
  rng = np.random.default_rng(3)
  bank, entries, bank_valid = make_bank(rng, [K, 6, 2, 0])
  n = 40
  labels = rng.integers(0, C, n).astype(np.int32)
  labels[::7] = 255
  feats = rng.normal(size=(n, DV)).astype(np.float32)
  projs = np.concatenate([np.arange(n)[:, None], rng.normal(size=(n, DP - 1))],
                         1).astype(np.float32)  # projection[0] = pixel id
  new = _push(bank, feats, projs, labels, jax.random.key(0), push_per_class=5, ks=KS,
              min_bank_size=4, chunk_size=4)
  got, valid = fifo.read_newest_first(new)
  old_count = np.array([K, 6, 2, 0])
  for c in range(C):
    n_new = min(5, int(np.sum(labels == c)))
    assert int(new.count[c]) == min(old_count[c] + n_new, K)
    ids = np.asarray(got[dgcl.PROJECTION][c, :n_new, 0]).astype(int)
    assert len(set(ids)) == n_new and np.all(labels[ids] == c)
    np.testing.assert_array_equal(got[dgcl.FEATURE][c, :n_new], feats[ids])
    want = (np_density(feats[ids], entries[dgcl.FEATURE][c], bank_valid[c], KS)
            if old_count[c] > 4 else np.zeros(n_new))
    np.testing.assert_allclose(got[dgcl.DENSITY][c, :n_new], want, rtol=1e-5, atol=1e-6)


def test_push_bank_pmap_matches_global_and_no_retrace():
  rng = np.random.default_rng(4)
  bank, _, _ = make_bank(rng, [K, 6, 2, 0])
  feats = rng.normal(size=(8, 2, 3, DV)).astype(np.float32)
  projs = rng.normal(size=(8, 2, 3, DP)).astype(np.float32)
  labels = rng.integers(0, C, (8, 2, 3)).astype(np.int32)
  keys = jax.random.split(jax.random.key(5), 8)
  fn = functools.partial(dgcl.push_bank, push_per_class=4, ks=KS, min_bank_size=4,
                         chunk_size=4)
  banks = jax.pmap(lambda f, p, l, k: fn(bank, f, p, l, k, axis_name="d"),
                   axis_name="d")(feats, projs, labels, keys)
  flat = lambda x: x.reshape((-1,) + x.shape[3:])  # noqa: E731

  @jax.jit
  @chex.assert_max_traces(n=1)
  def traced(*args):
    return fn(*args)

  ref = traced(bank, flat(feats), flat(projs), flat(labels), keys[0])
  for d in range(8):
    chex.assert_trees_all_close(jax.tree.map(lambda v: v[d], banks), ref, rtol=1e-6)
  b = ref
  for i in range(2):  # later steps reuse the trace
    b = traced(b, flat(feats) + i, flat(projs), flat(labels), jax.random.key(i))
  assert int(b.count[3]) > 0


def test_sample_pmap_is_global_selection():
  rng = np.random.default_rng(6)
  bank, _, _ = make_bank(rng, [K] * C)
  feats = rng.normal(size=(8, 9, DV)).astype(np.float32)
  labels = rng.integers(0, C, (8, 9)).astype(np.int32)
  keys = jax.random.split(jax.random.key(7), 8)
  kw = dict(KW, max_per_class=4, exclude_classes=(), small_class_density=1.0)
  sel = jax.pmap(lambda f, l, k: dgcl.sample(f, l, bank, k, axis_name="d", **kw)[0],
                 axis_name="d")(feats, labels, keys)
  ref, _ = _sample(feats.reshape(-1, DV), labels.reshape(-1), bank, keys[0], **kw)
  for d in range(8):
    chex.assert_trees_all_equal(jax.tree.map(lambda v: v[d], sel), ref)


def test_push_bank_under_mesh_jit_matches_single_device(mesh8):
  rng = np.random.default_rng(8)
  bank, _, _ = make_bank(rng, [K, 6, 2, 0])
  feats = rng.normal(size=(8, 6, DV)).astype(np.float32)
  projs = rng.normal(size=(8, 6, DP)).astype(np.float32)
  labels = rng.integers(0, C, (8, 6)).astype(np.int32)
  key = jax.random.key(9)
  kw = dict(push_per_class=4, ks=KS, min_bank_size=4, chunk_size=4)
  ref = _push(bank, feats.reshape(-1, DV), projs.reshape(-1, DP), labels.reshape(-1), key,
              **kw)
  shard = lambda x: jax.device_put(x, NamedSharding(mesh8, P("data")))  # noqa: E731
  got = jax.jit(lambda b, f, p, l, k: dgcl.push_bank(b, f, p, l, k, **kw))(
      bank, shard(feats), shard(projs), shard(labels), key)
  chex.assert_trees_all_close(got, ref, rtol=1e-6)


# --------------------------------------------------------------------------------------
# Negatives (issue 17): one shared permutation instead of a top-k of random bits per class.


def _negatives_case():
  labels = np.array([0] * 9 + [1] * 5 + [2] * 2 + [3] * 0 + [255] * 4 + [1, 0, 2, 0])
  rng = np.random.default_rng(7)
  perm = rng.permutation(len(labels))
  return labels[perm].astype(np.int32)


_negatives = jax.jit(jax.vmap(functools.partial(dgcl.sample_negatives, num_classes=C, num=6),
                              in_axes=(0, None, None)))


def test_sample_negatives_structure():
  labels = _negatives_case()
  valid = labels != 255
  idx, ok = (np.asarray(a) for a in _negatives(jax.random.split(jax.random.key(0), 50),
                                               labels, valid))
  for c in range(C):
    eligible = np.nonzero(valid & (labels != c))[0]
    want = min(6, len(eligible))
    assert np.all(ok[:, c, :want]) and not np.any(ok[:, c, want:])  # a prefix of `want`
    for draw in range(50):
      chosen = idx[draw, c][ok[draw, c]]
      assert len(set(chosen)) == want and set(chosen) <= set(eligible)
  # Fewer valid items than `num`: all of them.
  few = np.full_like(labels, 255)
  few[:3] = [0, 1, 1]
  idx, ok = (np.asarray(a)[0] for a in _negatives(jax.random.key(1)[None], few, few != 255))
  assert sorted(idx[0][ok[0]]) == [1, 2] and list(idx[1][ok[1]]) == [0]
  assert sorted(idx[3][ok[3]]) == [0, 1, 2]


def test_sample_negatives_distribution_is_uniform_per_class():
  # Each class's draw must be a uniform `num`-subset of its eligible items in uniformly
  # random order, as `ops.random_subset` on the mask `label != c` draws it: every eligible
  # item is chosen with probability num / n_eligible, and lands in the first slot with
  # probability 1 / n_eligible (chi-square tests over 4000 draws, fixed keys).
  from scipy import stats  # pylint: disable=g-import-not-at-top
  labels = _negatives_case()
  valid = labels != 255
  draws = 4000
  idx, ok = (np.asarray(a) for a in _negatives(
      jax.random.split(jax.random.key(3), draws), labels, valid))
  pvalues = []
  for c in range(C):
    eligible = np.nonzero(valid & (labels != c))[0]
    num = min(6, len(eligible))
    chosen = np.bincount(idx[:, c][ok[:, c]], minlength=len(labels))[eligible]
    assert chosen.sum() == draws * num
    pvalues.append(stats.chisquare(chosen, np.full(len(eligible), draws * num / len(eligible)))
                   .pvalue)
    first = np.bincount(idx[:, c, 0], minlength=len(labels))[eligible]
    pvalues.append(stats.chisquare(first).pvalue)
  assert min(pvalues) > 1e-3, pvalues
