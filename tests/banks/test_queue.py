"""FIFO feature queue (CAC's negative memory): order, overflow, invalid items, jit, devices."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semijax.banks import queue

pytestmark = pytest.mark.usefixtures("fast_compiles")

SPEC = {"feature": ((2,), jnp.float32), "label": ((), jnp.int32)}
_push = jax.jit(queue.push)


def _items(ids):
  ids = np.asarray(ids)
  return {"feature": np.stack([ids, -ids], -1).astype(np.float32),
          "label": ids.astype(np.int32)}


def _content(q):
  entries, valid = queue.read(q)
  return sorted(np.asarray(entries["label"])[np.asarray(valid)].tolist())


def test_fifo_keeps_the_newest_items_and_skips_invalid():
  k = 7
  q = queue.init(k, SPEC)
  assert _content(q) == [] and queue.capacity(q) == k
  ref, next_id = [], 1
  for n, invalid in [(3, ()), (4, (1,)), (9, (0, 8)), (2, ()), (12, (3, 4, 5))]:
    ids = np.arange(next_id, next_id + n)
    next_id += n
    valid = np.ones(n, bool)
    valid[list(invalid)] = False
    q = _push(q, _items(ids), valid)
    ref = (ref + [int(i) for i, v in zip(ids, valid) if v])[-k:]
    assert _content(q) == sorted(ref)
    assert int(queue.count(q)) == len(ref)
    entries, ok = queue.read(q)
    f = np.asarray(entries["feature"])[np.asarray(ok)]
    np.testing.assert_array_equal(f[:, 0], -f[:, 1])   # fields stay row-aligned


def test_push_without_valid_and_bad_fields():
  q = queue.push(queue.init(4, SPEC), _items([1, 2]))
  assert _content(q) == [1, 2]
  with pytest.raises(ValueError, match="do not match"):
    queue.push(q, {"feature": np.zeros((2, 2), np.float32)})
  with pytest.raises(ValueError, match="capacity must be > 0"):
    queue.init(0, SPEC)


def test_jit_equals_eager_and_no_retrace():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(q, items, valid):
    return queue.push(q, items, valid)

  q_jit = q_eager = queue.init(5, SPEC)
  rng = np.random.default_rng(0)
  for t in range(4):
    items, valid = _items(np.arange(4) + 10 * t), rng.random(4) < 0.7
    q_jit = step(q_jit, items, valid)
    q_eager = queue.push(q_eager, items, valid)
  for a, b in zip(jax.tree.leaves(q_jit), jax.tree.leaves(q_eager)):
    np.testing.assert_array_equal(a, b)


def test_pmap_push_matches_global_push():
  ids = np.arange(1, 25)
  valid = np.random.default_rng(1).random(24) < 0.8
  want = queue.push(queue.init(10, SPEC), _items(ids), valid)
  items = jax.tree.map(lambda x: x.reshape((8, 3) + x.shape[1:]), _items(ids))
  got = jax.pmap(lambda it, v: queue.push(queue.init(10, SPEC), it, v, axis_name="d"),
                 axis_name="d")(items, valid.reshape(8, 3))
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    for d in range(8):   # every device holds the same queue, equal to the global push
      np.testing.assert_array_equal(np.asarray(b)[d], a)
