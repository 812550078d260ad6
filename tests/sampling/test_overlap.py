"""Pixel-pair alignment of two overlapping crops at feature resolution, against NumPy loops."""

import jax
import numpy as np
import pytest

from semijax.sampling import overlap

pytestmark = pytest.mark.usefixtures("fast_compiles")


def np_pairs(x1, x2, boxes, flips, stride, v1, v2):
  """Explicit loops: view-1 position (i, j) pairs with view-2 (i - dy, j - dx), flips undone."""
  b, h, w = x1.shape[:3]
  out2 = np.zeros_like(x2)
  valid = np.zeros((b, h, w), bool)
  for n in range(b):
    c = x2[n][:, ::-1] if flips[n, 1] else x2[n]
    va = v1[n][:, ::-1] if flips[n, 0] else v1[n]
    vc = v2[n][:, ::-1] if flips[n, 1] else v2[n]
    dy, dx = (boxes[n, 1, :2] - boxes[n, 0, :2]) // stride
    for i in range(h):
      for j in range(w):
        r, s = i - dy, j - dx
        if 0 <= r < h and 0 <= s < w:
          out2[n, i, j] = c[r, s]
          valid[n, i, j] = va[i, j] and vc[r, s]
  return valid, out2


def test_pair_views_matches_loops():
  rng = np.random.default_rng(0)
  b, h, stride = 6, 5, 8
  x1 = rng.normal(size=(b, h, h, 3)).astype(np.float32)
  x2 = rng.normal(size=(b, h, h, 3)).astype(np.float32)
  offsets = rng.integers(-h + 1, h, (b, 2)) * stride
  top_left = rng.integers(0, 100, (b, 2)) * stride
  boxes = np.zeros((b, 2, 4), np.int32)
  boxes[:, 0, :2] = top_left
  boxes[:, 1, :2] = top_left + offsets
  boxes[:, :, 2:] = boxes[:, :, :2] + h * stride
  flips = rng.random((b, 2)) < 0.5
  v1, v2 = rng.random((b, h, h)) < 0.9, rng.random((b, h, h)) < 0.9
  (a, c), valid = jax.jit(lambda *args: (lambda r: ((r[0], r[1]), r[2]))(
      overlap.pair_views(*args[:4], stride=stride, valid1=args[4], valid2=args[5])))(
          x1, x2, boxes, flips, v1, v2)
  want_valid, want2 = np_pairs(x1, x2, boxes, flips, stride, v1, v2)
  np.testing.assert_array_equal(valid, want_valid)
  np.testing.assert_array_equal(np.asarray(c)[want_valid], want2[want_valid])
  np.testing.assert_array_equal(
      a, np.where(flips[:, 0, None, None, None], x1[:, :, ::-1], x1))


def test_valid_blocks_and_unflip():
  pad = np.zeros((2, 16, 16), bool)
  pad[0, 13:] = True          # rows 13-15 padded: block row 3 (rows 12-15) touches padding
  pad[1, :, 10:] = True
  valid = np.asarray(overlap.valid_blocks(~pad, 4))
  assert valid[0, :3].all() and not valid[0, 3].any()
  assert valid[1, :, :2].all() and not valid[1, :, 2:].any()
  with pytest.warns(DeprecationWarning, match="valid_blocks"):
    np.testing.assert_array_equal(overlap.block_valid(pad, 4), valid)   # deprecated form
  with pytest.raises(ValueError, match="multiple of stride"):
    overlap.valid_blocks(np.ones((1, 10, 10), bool), 4)
  x = np.arange(2 * 3 * 4).reshape(2, 3, 4)
  np.testing.assert_array_equal(overlap.unflip(x, np.array([True, False])),
                                np.stack([x[0, :, ::-1], x[1]]))
