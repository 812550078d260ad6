"""CSC bank: consistency update (eq. 8), Separ (eq. 9), the gate, enqueue, devices."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from semijax.banks import csc as csc_bank, fifo

pytestmark = pytest.mark.usefixtures("fast_compiles")

C, K, D = 4, 6, 5


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def random_bank(rng, count=(K, K, K, K)):
  return csc_bank.from_contents(_unit(rng.normal(size=(C, K, D))).astype(np.float32),
                                np.asarray(count))


def np_separation(feats, count, offset=None):
  """Eq. 9 as a double sum over class pairs."""
  c = len(count)
  means = [_unit(feats[i, :count[i]].mean(0)) if count[i] else np.zeros(feats.shape[-1])
           for i in range(c)]
  total = sum(means[i] @ means[j] for i in range(c) for j in range(c))
  return total + (c * (c - 1) if offset is None else offset)


def np_consistency(feats, count, x, labels, valid, *, normalize_mean):
  """Eq. 8 with loops: entries of present classes move towards the batch class mean."""
  out = np.array(feats, np.float64)
  for c in range(len(count)):
    rows = x[valid & (labels == c)].astype(np.float64)
    if len(rows) == 0 or count[c] == 0:
      continue
    z = rows.mean(0)
    if normalize_mean:
      z = _unit(z)
    alpha = count[c] / (count[c] + len(rows))   # eq. 8c
    out[c, :count[c]] = _unit(alpha * out[c, :count[c]] + (1 - alpha) * z)   # eq. 8b
  return out


_cons = jax.jit(csc_bank.consistency_update, static_argnames=("normalize_mean",))


def test_from_contents_read_and_init():
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(C, K, D)).astype(np.float32)
  bank = csc_bank.from_contents(feats, np.array([K, 3, 0, 1]))
  np.testing.assert_array_equal(bank.count, [K, 3, 0, 1])
  np.testing.assert_array_equal(bank.ptr, [0, 3, 0, 1])
  x, labels, valid = csc_bank.contents(bank)
  assert x.shape == (C * K, D)
  np.testing.assert_array_equal(valid.reshape(C, K).sum(1), [K, 3, 0, 1])
  np.testing.assert_array_equal(labels.reshape(C, K)[:, 0], np.arange(C))
  np.testing.assert_allclose(np.asarray(x).reshape(C, K, D)[1, :3], feats[1, :3])
  assert not np.any(np.asarray(x).reshape(C, K, D)[1, 3:])   # slots past count are zeroed
  assert not bool(csc_bank.is_complete(bank))
  empty = csc_bank.init(C, K, D)
  assert empty.entries[csc_bank.FEATURE].shape == (C, K, D) and int(empty.count.sum()) == 0
  g = csc_bank.init_gated(C, K, D)
  assert float(g.best) == 2 * C * C
  with pytest.raises(ValueError, match="count"):
    csc_bank.from_contents(feats, np.array([K + 1, 0, 0, 0]))
  with pytest.raises(ValueError, match=r"\[C, L, D\]"):
    csc_bank.from_contents(feats[0])


def test_separation_matches_the_double_sum():
  rng = np.random.default_rng(1)
  feats = _unit(rng.normal(size=(C, K, D))).astype(np.float32)
  for count in ([K] * C, [K, 2, 5, 1], [K, 0, 3, K]):
    bank = csc_bank.from_contents(feats, np.array(count))
    np.testing.assert_allclose(csc_bank.separation(bank), np_separation(feats, count),
                               rtol=1e-5)
  np.testing.assert_allclose(csc_bank.separation(bank, offset=0.0),
                             np_separation(feats, [K, 0, 3, K], offset=0.0), rtol=1e-5,
                             atol=1e-6)
  # Orthogonal class means: the double sum is the C diagonal terms, Separ = C + C (C - 1).
  ortho = np.zeros((C, K, D), np.float32)
  ortho[np.arange(C), :, np.arange(C)] = 1.0
  np.testing.assert_allclose(csc_bank.separation(csc_bank.from_contents(ortho)), C * C,
                             rtol=1e-6)


@pytest.mark.parametrize("normalize_mean", [False, True])
def test_consistency_update_matches_eq8_and_keeps_unit_norm(normalize_mean):
  rng = np.random.default_rng(2)
  count = np.array([K, 3, K, 0])
  bank = random_bank(rng, count)
  x = rng.normal(size=(20, D)).astype(np.float32) * 2.0
  labels = rng.integers(0, C, 20).astype(np.int32)
  labels[labels == 2] = 1      # class 2 absent from the batch: untouched
  labels[:2] = 255             # ignored
  valid = rng.random(20) < 0.9
  new, aux = _cons(bank, x, labels, valid, normalize_mean=normalize_mean)
  want = np_consistency(np.asarray(bank.entries[csc_bank.FEATURE]), count, x, labels, valid,
                        normalize_mean=normalize_mean)
  got = np.asarray(new.entries[csc_bank.FEATURE])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  norms = np.linalg.norm(got, axis=-1)
  slot_valid = np.arange(K)[None] < count[:, None]
  np.testing.assert_allclose(norms[slot_valid], 1.0, rtol=1e-6)
  assert not np.any(got[~slot_valid])   # empty slots stay empty
  np.testing.assert_array_equal(got[2], np.asarray(bank.entries[csc_bank.FEATURE])[2])
  np.testing.assert_array_equal(new.count, bank.count)
  np.testing.assert_array_equal(new.ptr, bank.ptr)
  n1 = np.sum(valid & (labels == 1))
  np.testing.assert_allclose(aux["alpha"][1], 3 / (3 + n1), rtol=1e-6)
  assert float(aux["alpha"][2]) == 1.0 and not bool(aux["present"][2])


def test_gate_accepts_and_rejects_as_specified():
  g = functools.partial(csc_bank.gate_accepts)
  # Algorithm 1: kept iff Separ decreases.
  assert bool(g(5.0, 6.0, 1.0)) and not bool(g(6.0, 6.0, 1.0)) and not bool(g(7.0, 6.0, 1.0))
  # With a tolerance x: also kept while below best + x, even if worse than before ...
  assert bool(g(7.0, 6.0, 6.5, tolerance=1.0))
  # ... and rejected when worse than before and beyond best + x.
  assert not bool(g(7.5, 6.0, 6.5, tolerance=1.0))
  assert not bool(g(7.6, 7.0, 6.5, tolerance=1.0))
  # The paper's text alone (within x of the best): an improvement beyond it is rejected.
  assert not bool(g(8.0, 9.0, 6.5, tolerance=1.0, improve=False))
  assert bool(g(7.4, 9.0, 6.5, tolerance=1.0, improve=False))
  # An incomplete previous bank (Separ undefined, +inf) is always improved on.
  assert bool(g(100.0, jnp.inf, 1.0))
  with pytest.raises(ValueError, match="reject"):
    g(1.0, 2.0, 3.0, improve=False)


def _two_class_bank():
  """Class 0 entries near e0, class 1 near e1 (2-D features), both full."""
  feats = np.zeros((2, 3, 2), np.float32)
  feats[0] = _unit([[1.0, 0.1], [1.0, -0.1], [1.0, 0.0]])
  feats[1] = _unit([[0.1, 1.0], [-0.1, 1.0], [0.0, 1.0]])
  return csc_bank.GatedBank(bank=csc_bank.from_contents(feats), best=jnp.asarray(100.0))


def _no_items(b=1, c=2, p=2, d=2):
  return np.zeros((b, c, p, d), np.float32), np.zeros((b, c, p), bool)


_update = jax.jit(csc_bank.gated_update,
                  static_argnames=("consistency", "gate", "normalize_mean",
                                   "consistency_tolerance", "consistency_improve",
                                   "enqueue_tolerance", "enqueue_improve", "offset"))


def test_gated_consistency_update_keeps_improvements_and_rejects_the_rest():
  state = _two_class_bank()
  before = float(csc_bank.separation(state.bank))
  # Class-0 features pointing away from class 1: the class means separate -> kept.
  away = np.array([[1.0, -1.0]] * 4, np.float32)
  new, aux = _update(state, away, np.zeros(4, np.int32), np.ones(4, bool), *_no_items())
  assert float(aux["consistency_tried"]) == 1.0 and float(aux["consistency_accepted"]) == 1.0
  assert float(aux["separation"]) < before
  assert float(new.best) == pytest.approx(float(aux["separation"]))
  assert not np.allclose(new.bank.entries["feature"], state.bank.entries["feature"])
  # Towards class 1: Separ grows -> rejected, the bank and best stay.
  towards = np.array([[0.0, 1.0]] * 4, np.float32)
  new, aux = _update(state, towards, np.zeros(4, np.int32), np.ones(4, bool), *_no_items())
  assert float(aux["consistency_accepted"]) == 0.0
  np.testing.assert_array_equal(new.bank.entries["feature"], state.bank.entries["feature"])
  assert float(new.best) == pytest.approx(before)
  # The same move without the gate is kept (module off: gate=False).
  new, aux = _update(state, towards, np.zeros(4, np.int32), np.ones(4, bool), *_no_items(),
                     gate=False)
  assert float(aux["consistency_accepted"]) == 1.0 and float(aux["separation"]) > before


def test_gated_enqueue_tolerance_and_incomplete_banks():
  state = _two_class_bank()
  before = float(csc_bank.separation(state.bank))
  # One class-0 item pointing at class 1: Separ rises by a small amount.
  items = np.zeros((1, 2, 1, 2), np.float32)
  items[0, 0, 0] = [0.0, 1.0]
  valid = np.zeros((1, 2, 1), bool)
  valid[0, 0, 0] = True
  after = float(csc_bank.separation(csc_bank.enqueue(state.bank, items, valid)))
  assert after > before
  no_anchor = (np.zeros((1, 2), np.float32), np.zeros(1, np.int32), np.zeros(1, bool))
  # Worse than before but within best + tolerance: kept (the code's enqueue rule).
  near = csc_bank.GatedBank(bank=state.bank, best=jnp.asarray(after - 0.5))
  new, aux = _update(near, *no_anchor, items, valid, enqueue_tolerance=1.0)
  assert float(aux["enqueue_accepted"]) == 1.0 and int(new.bank.count[0]) == 3
  assert int(new.bank.ptr[0]) == 1     # the oldest class-0 entry was replaced
  # Worse than before and beyond best + tolerance: rejected, bank restored.
  far = csc_bank.GatedBank(bank=state.bank, best=jnp.asarray(after - 2.0))
  new, aux = _update(far, *no_anchor, items, valid, enqueue_tolerance=1.0)
  assert float(aux["enqueue_tried"]) == 1.0 and float(aux["enqueue_accepted"]) == 0.0
  chex.assert_trees_all_equal(new.bank, state.bank)
  # Algorithm 1 (no tolerance): any worsening is rejected.
  new, aux = _update(near, *no_anchor, items, valid, enqueue_tolerance=None)
  assert float(aux["enqueue_accepted"]) == 0.0
  # An empty class: no consistency move, the enqueue is kept ungated, best unchanged.
  empty = csc_bank.GatedBank(bank=csc_bank.init(2, 3, 2), best=jnp.asarray(8.0))
  some = np.zeros((1, 2, 1, 2), np.float32)
  some[0, 0, 0] = [1.0, 0.0]
  new, aux = _update(empty, np.ones((1, 2), np.float32), np.zeros(1, np.int32),
                     np.ones(1, bool), some, valid)
  assert float(aux["consistency_tried"]) == 0.0 and float(aux["enqueue_tried"]) == 0.0
  assert int(new.bank.count[0]) == 1 and float(new.best) == 8.0
  assert float(aux["complete"]) == 0.0
  # The enqueue that completes the bank is kept (nothing to compare with) and sets best.
  both = np.zeros((1, 2, 1, 2), np.float32)
  both[0, 1, 0] = [0.0, 1.0]
  full_valid = np.zeros((1, 2, 1), bool)
  full_valid[0, 1, 0] = True
  new, aux = _update(new, *no_anchor, both, full_valid)
  assert float(aux["enqueue_accepted"]) == 1.0 and float(aux["complete"]) == 1.0
  np.testing.assert_allclose(new.best, csc_bank.separation(new.bank), rtol=1e-6)


def np_enqueue_items(feats, labels, k):
  """Per image and class: the normalised region mean and the pixel count drawn."""
  b = feats.shape[0]
  f = _unit(feats.reshape(b, -1, feats.shape[-1]))
  lab = labels.reshape(b, -1)
  means, counts = {}, {}
  for i in range(b):
    for c in range(C):
      rows = f[i][lab[i] == c]
      if len(rows):
        means[i, c] = _unit(rows.mean(0))
        counts[i, c] = min(len(rows), k)
  return means, counts, f, lab


def test_enqueue_items_match_numpy_and_write_fifo_by_image():
  rng = np.random.default_rng(3)
  b, h, w, k = 3, 4, 4, 3
  feats = rng.normal(size=(b, h, w, D)).astype(np.float32)
  labels = rng.integers(0, C, (b, h, w)).astype(np.int32)
  labels[0][labels[0] == 3] = 255   # class 3 absent from image 0
  labels[1, 0, :] = 255
  items, valid = jax.jit(functools.partial(csc_bank.enqueue_items, num_classes=C,
                                           pixels_per_class=k))(
                                               feats, labels, None, jax.random.key(0))
  items, valid = np.asarray(items), np.asarray(valid)
  means, counts, f, lab = np_enqueue_items(feats, labels, k)
  assert items.shape == (b, C, 1 + k, D)
  for i in range(b):
    for c in range(C):
      if (i, c) not in means:
        assert not valid[i, c].any()
        continue
      assert valid[i, c, 0]
      np.testing.assert_allclose(items[i, c, 0], means[i, c], rtol=1e-5, atol=1e-6)
      drawn = items[i, c, 1:][valid[i, c, 1:]]
      assert len(drawn) == counts[i, c]
      pool = f[i][lab[i] == c]
      # Each drawn pixel is a distinct pixel of class c in image i.
      match = np.abs(drawn[:, None, :] - pool[None, :, :]).max(-1) < 1e-6
      assert np.all(match.any(1)) and len(set(match.argmax(1))) == len(drawn)
  # Different keys draw different pixels; the region means do not change.
  items2, _ = csc_bank.enqueue_items(feats, labels, None, jax.random.key(1), num_classes=C,
                                     pixels_per_class=k)
  np.testing.assert_allclose(np.asarray(items2)[:, :, 0], items[:, :, 0], rtol=1e-6)
  assert not np.allclose(np.asarray(items2)[:, :, 1:], items[:, :, 1:])
  # Written FIFO, image by image: per class the newest entry is the last image's last pixel.
  bank = csc_bank.enqueue(csc_bank.init(C, 64, D), items, valid)
  newest, nvalid = fifo.read_newest_first(bank)
  for c in range(C):
    seq = [items[i, c, j] for i in range(b) for j in range(1 + k) if valid[i, c, j]]
    assert int(bank.count[c]) == len(seq)
    np.testing.assert_allclose(np.asarray(newest["feature"])[c][:len(seq)], seq[::-1],
                               rtol=1e-6)


def test_gated_update_no_retrace_and_unit_entries_over_steps():
  rng = np.random.default_rng(4)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(state, feats, labels, key):
    items, valid = csc_bank.enqueue_items(feats, labels, None, key, num_classes=C,
                                          pixels_per_class=2)
    anchors = feats.reshape(-1, D)
    return csc_bank.gated_update(state, anchors, labels.reshape(-1),
                                 jnp.ones(anchors.shape[0], bool), items, valid)

  state = csc_bank.init_gated(C, K, D)
  for t in range(6):
    feats = rng.normal(size=(2, 3, 3, D)).astype(np.float32)
    labels = rng.integers(0, C, (2, 3, 3)).astype(np.int32)
    state, aux = step(state, feats, labels, jax.random.key(t))
    e = np.asarray(state.bank.entries["feature"])
    v = np.arange(K)[None] < np.asarray(state.bank.count)[:, None]
    np.testing.assert_allclose(np.linalg.norm(e[v], axis=-1), 1.0, rtol=1e-5)
    assert float(state.best) <= 2 * C * C
  assert float(aux["complete"]) == 1.0


# ------------------------------------------------------------------------------------------
# Devices: the functions with axis_name under pmap and shard_map equal the global batch.


def _bank_ops(state, anchors, labels, valid, feats, pix_labels, key, axis_name=None):
  d = axis_name and jax.lax.axis_index(axis_name)
  b = feats.shape[0]
  ids = jnp.arange(b) + (0 if axis_name is None else d * b)
  items, items_valid = csc_bank.enqueue_items(feats, pix_labels, None, key, num_classes=C,
                                              pixels_per_class=2, image_ids=ids)
  cons, _ = csc_bank.consistency_update(state.bank, anchors, labels, valid,
                                        axis_name=axis_name)
  pushed = csc_bank.enqueue(state.bank, items, items_valid, axis_name=axis_name)
  gated, aux = csc_bank.gated_update(state, anchors, labels, valid, items, items_valid,
                                     axis_name=axis_name)
  return cons, pushed, gated, aux["separation"]


def test_bank_ops_under_pmap_shard_map_and_mesh_equal_the_global_batch(mesh8):
  rng = np.random.default_rng(5)
  state = csc_bank.GatedBank(bank=random_bank(rng, (K, 4, K, 2)), best=jnp.asarray(40.0))
  anchors = rng.normal(size=(16, D)).astype(np.float32)
  labels = rng.integers(0, C, 16).astype(np.int32)
  valid = rng.random(16) < 0.8
  feats = rng.normal(size=(8, 3, 3, D)).astype(np.float32)
  pix = rng.integers(0, C, (8, 3, 3)).astype(np.int32)
  key = jax.random.key(7)
  want = jax.jit(_bank_ops)(state, anchors, labels, valid, feats, pix, key)
  split = lambda x: x.reshape((8, -1) + x.shape[1:])  # noqa: E731
  got = jax.pmap(lambda a, l, v, f, p: _bank_ops(state, a, l, v, f, p, key, "d"),
                 axis_name="d")(split(anchors), split(labels), split(valid), feats[:, None],
                                pix[:, None])
  for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    for dev in range(8):
      np.testing.assert_allclose(np.asarray(g)[dev], np.asarray(w), rtol=1e-5, atol=1e-6)

  def per_device(a, l, v, f, p):
    out = _bank_ops(state, a, l, v, f, p, key, "data")
    return jax.tree.map(lambda x: x[None], out)

  fn = jax.shard_map(per_device, mesh=mesh8, in_specs=(P("data"),) * 5, out_specs=P("data"))
  shard = lambda x: jax.device_put(x, NamedSharding(mesh8, P("data")))  # noqa: E731
  got = jax.jit(fn)(*(shard(x) for x in (anchors, labels, valid, feats, pix)))
  for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(g)[3], np.asarray(w), rtol=1e-5, atol=1e-6)
  # jit over the mesh with sharded inputs (our trainer): the global values.
  mesh_out = jax.jit(_bank_ops)(state, shard(anchors), shard(labels), shard(valid),
                                shard(feats), shard(pix), key)
  for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(mesh_out)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)
