"""`semijax.ops`: fixed-size selection and PyTorch-semantics resizing against NumPy."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semijax import ops


def test_masked_mean_matches_numpy_and_empty_mask_is_zero_with_finite_grad():
  x = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
  m = np.random.default_rng(1).random((4, 5)) > 0.5
  np.testing.assert_allclose(ops.masked_mean(x, m), x[m].mean(), rtol=1e-6)
  empty = np.zeros_like(m)
  value, grad = jax.value_and_grad(lambda a: ops.masked_mean(a, empty))(jnp.asarray(x))
  assert float(value) == 0.0
  assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("k", [1, 3, 7, 10])
def test_masked_top_k_selects_best_candidates_in_order(k):
  rng = np.random.default_rng(k)
  scores = rng.permutation(10).astype(np.float32).reshape(1, 10)
  mask = rng.random((1, 10)) > 0.4
  values, idx, valid = ops.masked_top_k(scores, mask, k)
  expected = np.sort(scores[mask])[::-1][:k]
  n = len(expected)
  np.testing.assert_array_equal(np.asarray(valid[0]), np.arange(k) < n)
  np.testing.assert_array_equal(np.asarray(values[0, :n]), expected)
  np.testing.assert_array_equal(scores[0, np.asarray(idx[0, :n])], expected)
  assert np.all(np.isneginf(np.asarray(values[0, n:])))


def test_masked_top_k_candidates_beat_non_candidates_even_at_minus_inf():
  scores = np.array([[-np.inf, 5.0, -np.inf, 1.0]], np.float32)
  mask = np.array([[True, False, True, False]])
  _, idx, valid = ops.masked_top_k(scores, mask, 2)
  assert set(np.asarray(idx[0]).tolist()) == {0, 2} and bool(valid.all())


def test_masked_bottom_k_returns_smallest_values():
  scores = np.array([[3.0, 1.0, 2.0, 0.5]], np.float32)
  mask = np.array([[True, True, True, False]])
  values, _, valid = ops.masked_bottom_k(scores, mask, 2)
  np.testing.assert_array_equal(np.asarray(values[0]), [1.0, 2.0])
  assert bool(valid.all())


def test_random_subset_is_without_replacement_and_uniform():
  mask = np.zeros((50,), bool)
  mask[:20] = True
  counts = np.zeros(50)
  fn = jax.jit(chex.assert_max_traces(n=1)(lambda key: ops.random_subset(key, mask, 5)))
  for s in range(400):
    idx, valid = fn(jax.random.key(s))
    idx = np.asarray(idx)
    assert np.asarray(valid).all() and len(set(idx.tolist())) == 5 and np.all(idx < 20)
    counts[idx] += 1
  # Each candidate is picked with probability 1/4: 100 expected, binomial sd ~8.7.
  assert np.all(np.abs(counts[:20] - 100) < 5 * 8.7)


def _np_bilinear_align_corners(x, out_h, out_w):
  b, h, w, c = x.shape
  ys = np.arange(out_h) * ((h - 1) / (out_h - 1)) if out_h > 1 else np.zeros(1)
  xs = np.arange(out_w) * ((w - 1) / (out_w - 1)) if out_w > 1 else np.zeros(1)
  out = np.zeros((b, out_h, out_w, c), np.float64)
  for i, y in enumerate(ys):
    y0 = min(int(np.floor(y)), h - 1)
    y1 = min(y0 + 1, h - 1)
    fy = y - y0
    for j, xx in enumerate(xs):
      x0 = min(int(np.floor(xx)), w - 1)
      x1 = min(x0 + 1, w - 1)
      fx = xx - x0
      out[:, i, j] = ((1 - fy) * (1 - fx) * x[:, y0, x0] + (1 - fy) * fx * x[:, y0, x1]
                      + fy * (1 - fx) * x[:, y1, x0] + fy * fx * x[:, y1, x1])
  return out


@pytest.mark.parametrize("size", [(17, 23), (9, 9), (4, 6), (1, 5)])
def test_resize_bilinear_align_corners_matches_reference(size):
  x = np.random.default_rng(0).normal(size=(2, 9, 9, 3)).astype(np.float32)
  got = ops.resize_bilinear(x, size, align_corners=True)
  np.testing.assert_allclose(got, _np_bilinear_align_corners(x, *size), rtol=1e-5, atol=1e-5)


def test_resize_bilinear_half_pixel_matches_jax_image_without_antialias():
  x = np.random.default_rng(0).normal(size=(1, 8, 8, 2)).astype(np.float32)
  got = ops.resize_bilinear(x, (16, 16), align_corners=False)
  ref = jax.image.resize(x, (1, 16, 16, 2), "bilinear", antialias=False)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_resize_nearest_uses_floor_indexing():
  labels = np.arange(10 * 7).reshape(1, 10, 7)
  got = np.asarray(ops.resize_nearest(labels, (4, 3)))
  rows = np.floor(np.arange(4) * 10 / 4).astype(int)
  cols = np.floor(np.arange(3) * 7 / 3).astype(int)
  np.testing.assert_array_equal(got, labels[:, rows][:, :, cols])


def test_entropy_handles_zeros():
  p = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]], np.float32)
  np.testing.assert_allclose(ops.entropy(p), [0.0, np.log(2)], rtol=1e-6)
