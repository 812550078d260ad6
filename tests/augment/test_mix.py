"""CutMix/ClassMix masks vs the reference samplers, and the mixing itself."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np

from semijax.augment import mix as M

# Two-sample Kolmogorov-Smirnov critical value at alpha = 1e-3: c(alpha) = sqrt(-ln(alpha/2)/2).
KS_C = math.sqrt(-math.log(1e-3 / 2) / 2)


def _ks_statistic(a, b):
  a, b = np.sort(a), np.sort(b)
  grid = np.concatenate([a, b])
  cdf_a = np.searchsorted(a, grid, side="right") / len(a)
  cdf_b = np.searchsorted(b, grid, side="right") / len(b)
  return np.abs(cdf_a - cdf_b).max()


def _ks_bound(n, m):
  return KS_C * math.sqrt((n + m) / (n * m))


def _unimatch_boxes(rng, n, size, p=0.5, area=(0.02, 0.4), ratio=(0.3, 1 / 0.3)):
  """UniMatch's `obtain_cutmix_box` loop, literally, returning (h, w) of drawn boxes."""
  boxes = []
  for _ in range(n):
    if rng.random() > p:
      continue
    s = rng.uniform(*area) * size * size
    while True:
      r = rng.uniform(*ratio)
      w, h = int(np.sqrt(s / r)), int(np.sqrt(s * r))
      x, y = rng.integers(0, size), rng.integers(0, size)
      if x + w <= size and y + h <= size:
        break
    boxes.append((h, w))
  return np.array(boxes)


def _box_extent(masks):
  """Per mask: (present, h, w, is_exact_rectangle)."""
  rows, cols = masks.any(2), masks.any(1)
  h, w = rows.sum(1), cols.sum(1)
  # A rectangle: its pixel count is h * w and its rows and columns are contiguous runs.
  first_row, first_col = rows.argmax(1), cols.argmax(1)
  last_row = rows.shape[1] - 1 - rows[:, ::-1].argmax(1)
  last_col = cols.shape[1] - 1 - cols[:, ::-1].argmax(1)
  rect = ((masks.sum((1, 2)) == h * w) & (last_row - first_row + 1 == h) &
          (last_col - first_col + 1 == w)) | (h == 0)
  return h > 0, h, w, rect


@jax.jit
@chex.assert_max_traces(n=1)
def _cutmix_draws(rng):
  k1, k2 = jax.random.split(rng)
  return M.cutmix_box(k1, 4000, 32, 32), M.cutmix_box_params(k2, 500, 24, 40, p=1.0)


def test_cutmix_box_matches_unimatch_distribution():
  n, size = 4000, 32
  masks, _ = _cutmix_draws(jax.random.key(0))
  masks = np.asarray(masks)
  present, h, w, rect = _box_extent(masks)
  assert np.all(rect)
  # Probability of a box: binomial, 5 standard deviations.
  assert abs(present.mean() - 0.5) < 5 * math.sqrt(0.25 / n)
  ref = _unimatch_boxes(np.random.default_rng(0), n, size)
  ours = np.stack([h[present], w[present]], 1)
  for stat in (lambda b: b[:, 0] * b[:, 1] / size**2, lambda b: b[:, 0] / b[:, 1]):
    assert _ks_statistic(stat(ours), stat(ref)) < _ks_bound(len(ours), len(ref))
  # The drawn areas respect the bounds (floors only shrink the box).
  assert (ours[:, 0] * ours[:, 1]).max() <= 0.4 * size * size


def test_cutmix_box_params_fit_and_non_square():
  _, params = _cutmix_draws(jax.random.key(1))  # the second call must not retrace
  y0, x0, h, w, apply = map(np.asarray, params)
  assert apply.all()
  assert np.all((y0 >= 0) & (x0 >= 0) & (y0 + h <= 24) & (x0 + w <= 40) & (h > 0) & (w > 0))
  area = h * w / (24 * 40)
  assert area.max() <= 0.4 and area.min() >= 0.01


def test_cutmix_box_u2pl_is_half_the_image():
  n, height, width = 2000, 30, 40
  draw = jax.jit(chex.assert_max_traces(lambda k: (
      M.cutmix_box_u2pl_params(k, n, height, width), M.cutmix_box_u2pl(k, n, height, width)),
      n=1))
  draw(jax.random.key(3))
  (y0, x0, h, w), masks = draw(jax.random.key(2))
  y0, x0, h, w, masks = map(np.asarray, (y0, x0, h, w, masks))
  # U2PL: w ~ U{W/2 + 1, ..., W - 1}, h = round(H W / 2 / w), box inside the image.
  assert w.min() == width // 2 + 1 and w.max() == width - 1
  np.testing.assert_array_equal(h, np.round(height * width / 2 / w))
  assert np.all((x0 + w <= width) & (y0 + h <= height) & (x0 >= 0) & (y0 >= 0))
  counts = np.bincount(w - (width // 2 + 1), minlength=width // 2 - 1)
  expected = n / len(counts)
  assert np.all(np.abs(counts - expected) < 5 * math.sqrt(expected))
  _, mh, mw, rect = _box_extent(masks)
  assert np.all(rect) and np.array_equal(mh, h) and np.array_equal(mw, w)
  assert np.all(np.abs(masks.mean((1, 2)) - 0.5) <= w / 2 / (height * width) + 1e-9)


def test_mix_broadcasts_over_trailing_axes_and_pytrees():
  rng = np.random.default_rng(3)
  mask = rng.random((3, 4, 5)) < 0.5
  a = {"img": rng.random((3, 4, 5, 3)).astype(np.float32),
       "lab": rng.integers(0, 9, (3, 4, 5)).astype(np.int32),
       "logits": rng.random((3, 4, 5, 7)).astype(np.float32)}
  b = M.roll_batch(a)
  mixer = jax.jit(chex.assert_max_traces(M.mix, n=1))
  mixer(~mask, b, a)
  out = mixer(mask, a, b)
  for k in a:
    src = np.roll(a[k], -1, axis=0)
    np.testing.assert_array_equal(src[1], a[k][2])
    m = mask.reshape(mask.shape + (1,) * (a[k].ndim - 3))
    np.testing.assert_array_equal(out[k], np.where(m, src, a[k]))
    assert out[k].dtype == a[k].dtype


def test_apply_batch_prob_is_per_batch():
  mask = jnp.ones((4, 3, 3), bool)
  f = jax.jit(lambda k: jax.vmap(lambda kk: M.apply_batch_prob(kk, mask, p=0.5))(
      jax.random.split(k, 2000)))
  out, applied = f(jax.random.key(4))
  out, applied = np.asarray(out), np.asarray(applied)
  assert np.array_equal(out.all((1, 2, 3)), applied) and not out[~applied].any()
  assert abs(applied.mean() - 0.5) < 5 * math.sqrt(0.25 / 2000)
  # Under pmap the decision is device 0's on every device.
  keys = jnp.stack([jax.random.key(s) for s in range(8)])
  per = jax.pmap(lambda k: M.apply_batch_prob(k, jnp.ones((1, 2, 2), bool), p=0.5,
                                              axis_name="d")[1], axis_name="d")(keys)
  ref = jax.vmap(lambda k: M.apply_batch_prob(k, mask, p=0.5)[1])(keys)
  np.testing.assert_array_equal(np.asarray(per), np.full(8, bool(ref[0])))
  assert len(set(np.asarray(ref).tolist())) == 2  # devices' own keys would disagree


def _labels():
  labels = np.zeros((5, 6, 8), np.int32)
  labels[0] = np.arange(48).reshape(6, 8) % 5          # classes {0..4}
  labels[1] = 255
  labels[1, :, :3] = 7                                  # {7, 255}
  labels[2] = 255                                       # only ignore
  labels[3] = 0
  labels[3, 0] = 255                                    # {0, 255}
  labels[4] = np.arange(48).reshape(6, 8) % 2 * 5       # {0, 5}
  return labels


def test_classmix_picks_half_plus_one_of_present_classes():
  labels = _labels()
  expect_candidates = {False: [{0, 1, 2, 3, 4}, {7}, {255}, {0}, {0, 5}],
                       True: [{1, 2, 3, 4}, {7}, {255}, {0}, {5}]}
  seeds = 60

  @jax.jit
  @jax.vmap
  @chex.assert_max_traces(n=1)
  def draw(key):
    return {ex: (M.classmix_classes(key, labels, exclude_background=ex),
                 M.classmix_mask(key, labels, exclude_background=ex)) for ex in (False, True)}

  keys = jnp.stack([jax.random.key(s) for s in range(seeds)])
  draw(jnp.stack([jax.random.key(s) for s in range(seeds, 2 * seeds)]))
  out = jax.tree.map(np.asarray, draw(keys))
  for exclude in (False, True):
    tally = np.zeros((5, 256))
    for seed in range(seeds):
      (chosen, count), mask = jax.tree.map(lambda v: v[seed], out[exclude])
      for i, cand in enumerate(expect_candidates[exclude]):
        picked = set(np.flatnonzero(chosen[i]))
        assert count[i] == len(cand) and picked <= cand
        assert len(picked) == len(cand) // 2 + 1
        np.testing.assert_array_equal(mask[i], np.isin(labels[i], list(picked)))
      tally += chosen
    # Image 0 without background exclusion: each of 5 classes is picked with prob 3/5.
    if not exclude:
      freq = tally[0, :5] / seeds
      assert np.all(np.abs(freq - 0.6) < 5 * math.sqrt(0.24 / seeds))
