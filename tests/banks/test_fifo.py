"""ClassBank: FIFO order, wrap-around, per-class overflow, invalid items, randomness, devices."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semijax.banks import fifo

SPEC = {"x": ((2,), jnp.float32), "t": ((), jnp.int32)}


pytestmark = pytest.mark.usefixtures("fast_compiles")

# Jitted once per shape: eager dispatch compiles every primitive separately (slow on CPU).
_write = jax.jit(fifo.write)
_push = jax.jit(fifo.push, static_argnames=("push_per_class",))


def _items(ids):
  ids = np.asarray(ids)
  return {"x": np.stack([ids, -ids], -1).astype(np.float32), "t": ids.astype(np.int32)}


def _newest_first_ids(bank):
  entries, valid = fifo.read_newest_first(bank)
  t, v = np.asarray(entries["t"]), np.asarray(valid)
  return [list(t[c][v[c]]) for c in range(t.shape[0])]


def test_init_read_empty():
  bank = fifo.init(3, 4, SPEC)
  entries, valid = fifo.read(bank)
  assert entries["x"].shape == (3, 4, 2) and entries["t"].dtype == jnp.int32
  assert not np.any(valid) and not bool(fifo.is_full(bank))
  assert fifo.nbytes(21, 10000, {"f": ((256,), jnp.float32)}) == 21 * 10000 * 256 * 4


def test_write_fifo_order_and_wraparound():
  # Python reference: the PyTorch banks prepend new items and truncate to K.
  k = 5
  bank = fifo.init(2, k, SPEC)
  ref = [[], []]
  next_id = 1
  for sizes in [(3, 0), (4, 1), (2, 6), (0, 2), (7, 3)]:
    p = 7
    ids = np.zeros((2, p), np.int64)
    valid = np.zeros((2, p), bool)
    for c, s in enumerate(sizes):
      ids[c, :s] = np.arange(next_id, next_id + s)
      valid[c, :s] = True
      next_id += s
      ref[c] = list(ids[c, :s][::-1]) + ref[c]
      ref[c] = ref[c][:k]
    items = {"x": np.stack([ids, -ids], -1).astype(np.float32), "t": ids.astype(np.int32)}
    bank = _write(bank, items, valid)
    assert _newest_first_ids(bank) == ref
    np.testing.assert_array_equal(bank.count, [len(r) for r in ref])
  assert bool(fifo.is_full(bank))
  entries, valid = fifo.read(bank)
  np.testing.assert_array_equal(entries["x"][..., 1], -entries["x"][..., 0])


def test_write_interleaved_invalid_and_more_than_capacity():
  bank = fifo.init(1, 3, SPEC)
  ids = np.arange(1, 9)[None]
  valid = np.array([[True, False, True, True, False, True, True, True]])
  bank = _write(bank, {"x": np.stack([ids, ids], -1).astype(np.float32), "t": ids}, valid)
  # Valid in order: 1 3 4 6 7 8 -> sequential writes leave the last three.
  assert _newest_first_ids(bank) == [[8, 7, 6]]
  assert int(bank.count[0]) == 3


def test_push_overflow_invalid_and_no_replacement():
  c, k, p = 4, 50, 6
  rng = np.random.default_rng(0)
  n = 200
  labels = rng.integers(0, c + 1, n)  # label c is out of range
  labels[rng.random(n) < 0.1] = 255
  valid = rng.random(n) < 0.8
  ids = np.arange(1, n + 1)
  bank = _push(fifo.init(c, k, SPEC), _items(ids), labels, valid, jax.random.key(1),
               push_per_class=p)
  got = _newest_first_ids(bank)
  for cls in range(c):
    cand = set(ids[valid & (labels == cls)])
    assert len(got[cls]) == min(p, len(cand))
    assert len(set(got[cls])) == len(got[cls])  # without replacement
    assert set(got[cls]) <= cand  # only valid items of that class


def test_push_small_class_takes_all():
  labels = np.array([0, 0, 1, 255, 2])
  bank = _push(fifo.init(3, 8, SPEC), _items([1, 2, 3, 4, 5]), labels, np.ones(5, bool),
               jax.random.key(0), push_per_class=4)
  got = _newest_first_ids(bank)
  assert sorted(got[0]) == [1, 2] and got[1] == [3] and got[2] == [5]


def test_select_per_class_is_uniform():
  n, p, trials = 10, 3, 4000
  labels = np.zeros(n, np.int32)
  labels[::2] = 1  # class 1: items 0, 2, ..., 8; class 0: 1, 3, ..., 9
  keys = jax.random.split(jax.random.key(7), trials)
  idx, valid = jax.vmap(lambda r: fifo.select_per_class(
      labels, np.ones(n, bool), r, num_classes=2, max_per_class=p))(keys)
  idx, valid = np.asarray(idx), np.asarray(valid)
  assert valid.all()
  for cls in range(2):
    rows = np.sort(idx[:, cls], axis=1)
    assert np.all(np.diff(rows, axis=1) > 0)  # distinct
    assert np.all(labels[rows] == cls)
    freq = np.bincount(rows.ravel(), minlength=n)[labels == cls] / trials
    # Each of 5 items is chosen with probability 3/5; binomial sd ~ 0.008.
    np.testing.assert_allclose(freq, p / 5, atol=0.04)
  # Positions within the subset are random too (first slot uniform over the class).
  first = np.bincount(idx[:, 0, 0], minlength=n)[labels == 0] / trials
  np.testing.assert_allclose(first, 1 / 5, atol=0.04)


def test_push_with_scores_keeps_highest():
  labels = np.array([0, 0, 0, 1, 1, 0])
  scores = np.array([0.1, 0.9, 0.5, -1.0, 2.0, 0.7])
  bank = _push(fifo.init(2, 4, SPEC), _items(np.arange(1, 7)), labels, np.ones(6, bool),
               None, push_per_class=2, scores=scores)
  got = _newest_first_ids(bank)
  assert sorted(got[0]) == [2, 6] and sorted(got[1]) == [4, 5]


def test_push_per_class_above_capacity_raises():
  with pytest.raises(ValueError):
    fifo.push(fifo.init(2, 3, SPEC), _items([1]), [0], [True], jax.random.key(0),
              push_per_class=4)


def test_jit_equals_eager_and_no_retrace():
  c, k, n = 3, 8, 40
  rng = np.random.default_rng(1)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(bank, items, labels, key):
    return fifo.push(bank, items, labels, labels != 255, key, push_per_class=3)

  bank_j = bank_e = fifo.init(c, k, SPEC)
  for i in range(2):
    labels = rng.integers(0, c, n).astype(np.int32)
    items = _items(rng.integers(0, 1000, n))
    key = jax.random.key(i)
    bank_j = step(bank_j, items, labels, key)
    bank_e = fifo.push(bank_e, items, labels, labels != 255, key, push_per_class=3)
  chex.assert_trees_all_equal(bank_j, bank_e)
  np.testing.assert_array_equal(bank_j.count, [6, 6, 6])
  np.testing.assert_array_equal(bank_j.ptr, [6, 6, 6])


def test_pmap_push_matches_global_push():
  c, k, n_local = 3, 12, 6
  rng = np.random.default_rng(2)
  labels = rng.integers(0, c + 1, (8, n_local)).astype(np.int32)  # includes out-of-range
  items = _items(np.arange(1, 8 * n_local + 1))
  items = jax.tree.map(lambda v: v.reshape((8, n_local) + v.shape[1:]), items)
  keys = jax.random.split(jax.random.key(3), 8)  # different per device: device 0's wins
  bank0 = fifo.init(c, k, SPEC)

  def per_device(items, labels, key):
    return fifo.push(bank0, items, labels, labels < c, key, push_per_class=5, axis_name="d")

  banks = jax.pmap(per_device, axis_name="d")(items, labels, keys)
  flat = jax.tree.map(lambda v: v.reshape((-1,) + v.shape[2:]), items)
  ref = _push(bank0, flat, labels.reshape(-1), labels.reshape(-1) < c, keys[0],
              push_per_class=5)
  for d in range(8):
    chex.assert_trees_all_equal(jax.tree.map(lambda v: v[d], banks), ref)


def test_from_entries_round_trips_read_and_continues_like_pushes():
  c, k, n = 3, 5, 30
  rng = np.random.default_rng(4)
  pushed = fifo.init(c, k, SPEC)
  for i in range(2):   # classes 0 and 1 wrap around, class 2 stays empty
    labels = np.where(rng.random(n) < 0.6, 0, 1).astype(np.int32)
    pushed = _push(pushed, _items(np.arange(n) + 100 * i), labels, labels != 2,
                   jax.random.key(i), push_per_class=3 if i == 0 else 4)
  entries, valid = fifo.read(pushed)
  built = fifo.from_entries(entries, pushed.count, ptr=pushed.ptr)
  chex.assert_trees_all_equal(built, pushed)
  got_entries, got_valid = fifo.read(built)
  np.testing.assert_array_equal(got_valid, valid)
  chex.assert_trees_all_equal(got_entries, entries)
  # Built from contents, then pushed: the same as pushing into the pushed bank.
  labels = rng.integers(0, c, n).astype(np.int32)
  items = _items(np.arange(n) + 1000)
  chex.assert_trees_all_equal(
      _push(built, items, labels, labels < c, jax.random.key(9), push_per_class=2),
      _push(pushed, items, labels, labels < c, jax.random.key(9), push_per_class=2))


def test_from_entries_defaults_zeroes_unused_slots_and_checks():
  x = np.arange(2 * 4 * 2, dtype=np.float32).reshape(2, 4, 2) + 1
  t = np.arange(8, dtype=np.int32).reshape(2, 4) + 1
  full = fifo.from_entries({"x": x, "t": t})
  np.testing.assert_array_equal(full.count, [4, 4])
  np.testing.assert_array_equal(full.ptr, [0, 0])
  assert bool(fifo.is_full(full)) and full.entries["t"].dtype == jnp.int32
  part = fifo.from_entries({"x": x, "t": t}, np.array([1, 3]))
  np.testing.assert_array_equal(part.ptr, [1, 3])
  np.testing.assert_array_equal(part.entries["t"], [[1, 0, 0, 0], [5, 6, 7, 0]])
  np.testing.assert_array_equal(part.entries["x"][0, 1:], 0.0)
  # Same as writing the items into an empty bank.
  written = _write(fifo.init(2, 4, SPEC), {"x": x, "t": t}, np.arange(4) < np.array([[1], [3]]))
  chex.assert_trees_all_equal(part, written)
  # Under jit (traced counts are not checked).
  chex.assert_trees_all_equal(jax.jit(fifo.from_entries)({"x": x, "t": t}, np.array([1, 3])),
                              part)
  for bad in (np.array([1, 5]), np.array([-1, 0]), np.array([1, 2, 3]), np.array([0.5, 1.0])):
    with pytest.raises(ValueError, match="count"):
      fifo.from_entries({"x": x, "t": t}, bad)
  with pytest.raises(ValueError, match="C, K"):
    fifo.from_entries({"x": x, "t": t[:1]})
  with pytest.raises(ValueError):
    fifo.from_entries({})
