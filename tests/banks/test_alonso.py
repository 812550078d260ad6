"""Alonso et al.'s class-wise bank: FQF, top-K per image and class, FIFO, devices."""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from semijax.banks import alonso, fifo

C, PSI, D = 3, 6, 4

pytestmark = pytest.mark.usefixtures("fast_compiles")

_push = jax.jit(alonso.push, static_argnames=("per_image", "scope"))


def _ids(bank):
  """Entries newest first, as the first feature (the item id)."""
  entries, valid = fifo.read_newest_first(bank)
  x = np.asarray(entries[alonso.PROJECTION][..., 0])
  v = np.asarray(valid)
  return [list(x[c][v[c]].astype(int)) for c in range(x.shape[0])]


def np_push(ref, ids, labels, valid, scores, per_image, scope):
  """Reference: per (image, class) the `per_image` highest scores (ties: lower index), written
  image by image highest first; per class only the newest PSI survive (prepend + truncate)."""
  b = ids.shape[0]
  for c in range(C):
    new = []
    if scope == "image":
      for i in range(b):
        cand = [j for j in range(ids.shape[1]) if valid[i, j] and labels[i, j] == c]
        cand.sort(key=lambda j: (-scores[i, j], j))
        new += [ids[i, j] for j in cand[:per_image]]
    else:
      cand = [(i, j) for i in range(b) for j in range(ids.shape[1])
              if valid[i, j] and labels[i, j] == c]
      cand.sort(key=lambda ij: (-scores[ij], ij[0] * ids.shape[1] + ij[1]))
      new = [ids[ij] for ij in cand[:b * per_image]]
    ref[c] = (new[::-1] + ref[c])[:PSI]
  return ref


def make_step(rng, b=4, n=9):
  ids = rng.permutation(1000)[:b * n].reshape(b, n) + 1
  labels = rng.integers(0, C + 1, (b, n))
  labels[rng.random((b, n)) < 0.1] = 255
  valid = rng.random((b, n)) < 0.8
  scores = rng.random((b, n)).astype(np.float32)
  proj = np.zeros((b, n, D), np.float32)
  proj[..., 0] = ids
  proj[..., 1:] = rng.normal(size=(b, n, D - 1))
  return proj, ids, labels, valid, scores


@pytest.mark.parametrize("scope,per_image", [("image", 1), ("image", 2), ("batch", 2)])
def test_push_keeps_the_highest_scores_fifo(scope, per_image):
  rng = np.random.default_rng(0)
  bank = alonso.init_bank(C, PSI, D)
  ref = [[] for _ in range(C)]
  for _ in range(4):  # enough to wrap around
    proj, ids, labels, valid, scores = make_step(rng)
    bank = _push(bank, proj, labels, valid, scores, per_image=per_image, scope=scope)
    ref = np_push(ref, ids, labels, valid, scores, per_image, scope)
    assert _ids(bank) == ref
  assert np.all(np.asarray(bank.count) == PSI)


def test_highest_not_lowest_and_random_without_scores():
  proj = np.zeros((1, 5, D), np.float32)
  proj[0, :, 0] = np.arange(1, 6)
  labels = np.zeros((1, 5), np.int32)
  scores = np.array([[0.1, 0.9, 0.5, 0.7, 0.2]], np.float32)
  bank = _push(alonso.init_bank(C, PSI, D), proj, labels, np.ones((1, 5), bool), scores,
               per_image=2)
  assert sorted(_ids(bank)[0]) == [2, 4]  # the official ascending sort would keep 1 and 5
  picks = set()
  for seed in range(6):
    bank = alonso.push(alonso.init_bank(C, PSI, D), proj, labels, np.ones((1, 5), bool),
                       rng=jax.random.key(seed), per_image=2)
    picks.add(tuple(sorted(_ids(bank)[0])))
    assert len(_ids(bank)[0]) == 2
  assert len(picks) > 1
  with pytest.raises(ValueError, match="scores"):
    alonso.push(alonso.init_bank(C, PSI, D), proj, labels, np.ones((1, 5), bool))


def test_quality_filter():
  pred = np.array([0, 1, 2, 1, 0])
  conf = np.array([0.99, 0.96, 0.95, 0.99, 0.2])
  labels = np.array([0, 1, 2, 2, 255])
  np.testing.assert_array_equal(alonso.quality_mask(pred, conf, labels),
                                [True, True, False, False, False])  # strict > phi


def test_per_image_count_rules():
  assert alonso.per_image_count(256, 100, rule="paper") == 3
  assert alonso.per_image_count(256, 744, rule="cityscapes_official") == 1
  # Official VOC: C / 3 * round(psi / N_l).
  assert alonso.per_image_count(256, 1323, rule="voc_official", num_classes=21) == 1
  assert alonso.per_image_count(256, 212, rule="voc_official", num_classes=21) == 7
  assert alonso.per_image_count(256, 530, rule="voc_official", num_classes=21) == 1
  with pytest.raises(ValueError, match="rule"):
    alonso.per_image_count(256, 10, rule="nope")


def test_from_entries_and_empty_bank():
  e = [np.ones((2, D)), np.zeros((0, D)), np.arange(10 * D, dtype=np.float32).reshape(10, D)]
  bank = alonso.from_entries(e, PSI)
  np.testing.assert_array_equal(bank.count, [2, 0, PSI])
  entries, valid = fifo.read_newest_first(bank)
  np.testing.assert_array_equal(np.asarray(entries[alonso.PROJECTION])[2, :PSI],
                                e[2][::-1][:PSI])  # the newest PSI, newest first
  empty = alonso.init_bank(C, PSI, D)
  assert not np.any(fifo.read(empty)[1])


def test_jit_matches_eager():
  rng = np.random.default_rng(1)
  proj, _, labels, valid, scores = make_step(rng)
  bank = alonso.init_bank(C, PSI, D)
  eager = alonso.push(bank, proj, labels, valid, scores, per_image=2)
  jitted = _push(bank, proj, labels, valid, scores, per_image=2)
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
    np.testing.assert_array_equal(a, b)


def test_pmap_and_shard_map_push_the_global_batch(mesh8):
  rng = np.random.default_rng(2)
  proj, _, labels, valid, scores = make_step(rng, b=8)
  bank = alonso.from_entries([rng.normal(size=(3, D)) for _ in range(C)], PSI)
  want = _push(bank, proj, labels, valid, scores, per_image=2)
  fn = functools.partial(alonso.push, per_image=2, axis_name="d")
  got = jax.pmap(lambda p, y, v, s: fn(bank, p, y, v, s), axis_name="d")(
      proj[:, None], labels[:, None], valid[:, None], scores[:, None])
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    for dev in range(8):
      np.testing.assert_array_equal(np.asarray(b)[dev], a)
  def per_device(p, y, v, s, bank):
    new = alonso.push(bank, p, y, v, s, per_image=2, axis_name="data")
    return jax.tree.map(lambda x: x[None], new)  # one copy per device, all compared

  sm = jax.shard_map(per_device, mesh=mesh8, in_specs=(P("data"),) * 4 + (P(),),
                     out_specs=P("data"))
  shard = lambda x: jax.device_put(x, NamedSharding(mesh8, P("data")))  # noqa: E731
  got = jax.jit(sm)(shard(proj), shard(labels), shard(valid), shard(scores), bank)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    for dev in range(8):
      np.testing.assert_array_equal(np.asarray(b)[dev], a)
