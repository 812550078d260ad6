"""Semi-hard anchor sampling (ContrastiveSeg / CSC): the official counts, membership, randomness."""

import chex
import jax
import numpy as np
import pytest

from semijax.sampling import semihard

pytestmark = pytest.mark.usefixtures("fast_compiles")

C = 4


def np_keep_counts(num_hard, num_easy, v):
  """The candidate code's `_sampling` split for one image and class, or None if skipped."""
  if num_hard + num_easy <= v:
    return None
  if num_hard >= v / 2 and num_easy >= v / 2:
    return v // 2, v - v // 2
  if num_easy < v / 2:
    return v - num_easy, num_easy
  return num_hard, v - num_hard


def make_maps(rng, b=6, h=5, w=6):
  labels = rng.integers(0, C, (b, h, w)).astype(np.int32)
  labels[rng.random((b, h, w)) < 0.1] = 255
  labels[0][labels[0] == 1] = 0           # class 1 absent from image 0
  preds = np.where(rng.random((b, h, w)) < 0.5, labels, rng.integers(0, C, (b, h, w)))
  preds = np.where(preds == 255, 0, preds).astype(np.int32)
  preds[1][labels[1] == 2] = 2            # class 2 of image 1: all easy
  preds[2][labels[2] == 3] = 0            # class 3 of image 2: all hard
  return labels, preds


_sample = jax.jit(lambda *a, **k: semihard.sample(*a, **k)[0],
                  static_argnames=("views", "ignore_index"))


@pytest.mark.parametrize("views", [(2, 2, 2, 2), (3, 6, 5, 4), (1, 9, 2, 7)])
def test_counts_membership_and_hard_easy_split(views):
  rng = np.random.default_rng(0)
  labels, preds = make_maps(rng)
  sel = _sample(labels, preds, jax.random.key(0), views=views)
  idx, valid, hard = (np.asarray(x) for x in sel)
  b = labels.shape[0]
  assert idx.shape == (b, C, max(views))
  flat_l, flat_p = labels.reshape(b, -1), preds.reshape(b, -1)
  for i in range(b):
    for c in range(C):
      is_c = flat_l[i] == c
      num_hard = int(np.sum(is_c & (flat_p[i] != c)))
      num_easy = int(np.sum(is_c & (flat_p[i] == c)))
      want = np_keep_counts(num_hard, num_easy, views[c])
      row_valid = valid[i, c]
      if want is None:
        assert not row_valid.any()
        continue
      assert row_valid.sum() == views[c] and row_valid[:views[c]].all()   # a prefix
      chosen = idx[i, c][row_valid]
      assert len(set(chosen)) == len(chosen)                    # without replacement
      assert np.all(flat_l[i][chosen] == c)                     # labelled c
      h = hard[i, c][row_valid]
      assert np.all(flat_p[i][chosen][h] != c) and np.all(flat_p[i][chosen][~h] == c)
      assert (h.sum(), (~h).sum()) == want
      assert np.all(np.diff(h.astype(int)) <= 0)                # hard slots first
  with pytest.raises(ValueError, match="weak_classes"):
    semihard.views_per_class(C, weak_classes=(C,))


def test_views_per_class_and_the_official_weak_lists():
  assert semihard.views_per_class(4, num_views=16, num_views_weak=64, weak_classes=(1, 3)) == (
      16, 64, 16, 64)
  voc = semihard.views_per_class(21, weak_classes=semihard.VOC_WEAK_CLASSES)
  assert [c for c in range(21) if voc[c] == 64] == [2, 4, 5, 9, 11, 16, 18, 20]
  city = semihard.views_per_class(19, weak_classes=semihard.CITYSCAPES_WEAK_CLASSES)
  assert sum(v == 64 for v in city) == 13 and city[0] == 16


def test_valid_mask_and_ignore_are_never_drawn():
  rng = np.random.default_rng(1)
  labels, preds = make_maps(rng)
  allowed = rng.random(labels.shape) < 0.7
  sel, _ = semihard.sample(labels, preds, jax.random.key(1), views=(2, 2, 2, 2),
                           valid=allowed)
  b = labels.shape[0]
  idx, valid = np.asarray(sel.index), np.asarray(sel.valid)
  for i in range(b):
    chosen = idx[i][valid[i]]
    assert np.all(allowed.reshape(b, -1)[i][chosen])
    assert np.all(labels.reshape(b, -1)[i][chosen] != 255)


def test_draws_are_uniform_within_each_kind():
  # One image, class 0: 6 hard and 10 easy pixels, V = 4 -> 2 hard and 2 easy per draw.
  labels = np.zeros((1, 4, 4), np.int32)
  preds = np.zeros((1, 4, 4), np.int32)
  preds.reshape(-1)[:6] = 1
  views = (4, 2, 2, 2)
  f = jax.jit(jax.vmap(lambda k: semihard.sample(labels, preds, k, views=views)[0]))
  sel = f(jax.random.split(jax.random.key(2), 3000))
  idx, valid = np.asarray(sel.index)[:, 0, 0], np.asarray(sel.valid)[:, 0, 0]
  counts = np.bincount(idx[valid], minlength=16)
  # Each hard pixel is chosen with probability 2/6, each easy one with 2/10.
  np.testing.assert_allclose(counts[:6] / 3000, 2 / 6, atol=0.03)
  np.testing.assert_allclose(counts[6:] / 3000, 2 / 10, atol=0.03)


def test_a_shard_with_global_image_ids_draws_what_the_global_batch_draws():
  rng = np.random.default_rng(3)
  labels, preds = make_maps(rng, b=6)
  key = jax.random.key(4)
  views = (2, 3, 2, 2)
  whole = _sample(labels, preds, key, views=views)
  part, _ = semihard.sample(labels[3:], preds[3:], key, views=views, image_ids=np.arange(3, 6))
  chex.assert_trees_all_equal(jax.tree.map(lambda x: x[3:], whole), part)
  other = _sample(labels, preds, jax.random.key(5), views=views)
  assert not np.array_equal(np.asarray(other.index), np.asarray(whole.index))


def test_no_retrace():
  rng = np.random.default_rng(6)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(labels, preds, key):
    return semihard.sample(labels, preds, key, views=(2, 3, 2, 2))

  for t in range(3):
    labels, preds = make_maps(rng)
    out, aux = f(labels, preds, jax.random.key(t))
    assert out.index.shape == (6, C, 3)
    num = np.asarray(out.valid).sum()
    assert float(aux["num_anchors"]) == num
    np.testing.assert_allclose(aux["hard_ratio"], np.asarray(out.hard).sum() / max(num, 1))
    assert float(aux["image_classes"]) == np.asarray(out.valid).any(-1).sum()


def test_deprecated_semi_hard_anchors_returns_the_selection():
  rng = np.random.default_rng(7)
  labels, preds = make_maps(rng)
  with pytest.warns(DeprecationWarning, match="semihard.sample"):
    old = semihard.semi_hard_anchors(labels, preds, jax.random.key(0), views=(2, 3, 2, 2))
  new, _ = semihard.sample(labels, preds, jax.random.key(0), views=(2, 3, 2, 2))
  chex.assert_trees_all_equal(old, new)
