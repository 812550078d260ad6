"""DGCL entropy-percentile pseudo-label filtering (eqs. 4-6) and its schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semijax.pseudo import entropy as entropy_lib

pytestmark = pytest.mark.usefixtures("fast_compiles")


def _probs(rng, shape, c=5):
  logits = rng.normal(size=shape + (c,)) * 2.0
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return (p / p.sum(-1, keepdims=True)).astype(np.float32)


def np_entropy(p):
  p = p.astype(np.float64)
  return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), -1)


_percentile = jax.jit(entropy_lib.masked_percentile)


@pytest.mark.parametrize("n", [1, 2, 7, 100])
def test_masked_percentile_matches_numpy(n):
  rng = np.random.default_rng(n)
  x = rng.normal(size=(11, 13)).astype(np.float32)
  x[0, :4] = x[1, 0]  # ties
  valid = np.zeros(x.shape, bool)
  valid.flat[rng.permutation(x.size)[:n]] = True
  for q in [0.0, 3.0, 20.0, 37.5, 50.0, 80.0, 99.0, 100.0]:
    want = np.percentile(x[valid], q)  # method='linear'
    np.testing.assert_allclose(_percentile(x, valid, q), want, rtol=1e-6, atol=1e-6)


def test_masked_percentile_empty_is_inf():
  assert np.isinf(float(_percentile(np.ones(4, np.float32), np.zeros(4, bool), 50.0)))


def test_entropy_percentile_mask_matches_numpy():
  rng = np.random.default_rng(0)
  probs = _probs(rng, (2, 9, 9))
  valid = rng.random((2, 9, 9)) < 0.8
  ent = np_entropy(probs)
  fn = jax.jit(lambda p, v, d: entropy_lib.entropy_percentile_mask(p, v, drop_percent=d))
  for drop in [20.0, 7.5, 0.0]:
    thresh = np.percentile(ent[valid], 100 - drop)
    want = valid & (ent < thresh)  # eq. 6; H >= eta dropped (official)
    got = np.asarray(fn(probs, valid, drop))
    near = np.abs(ent - thresh) < 1e-5  # float32 vs float64 at the boundary
    np.testing.assert_array_equal(got[~near], want[~near])
    assert abs(got.sum() - want.sum()) <= near.sum()
  # drop = 20 %: about 80 % of the valid pixels are kept.
  kept = np.asarray(fn(probs, valid, 20.0)).sum() / valid.sum()
  assert 0.78 <= kept <= 0.81
  assert not np.any(np.asarray(fn(probs, valid, 20.0)) & ~valid)


def test_filtered_pseudo_labels():
  rng = np.random.default_rng(1)
  probs = _probs(rng, (2, 6, 6))
  valid = np.ones((2, 6, 6), bool)
  valid[0, 0] = False
  labels, keep, aux = jax.jit(lambda p, v: entropy_lib.filtered_pseudo_labels(
      p, v, drop_percent=30.0))(probs, valid)
  labels, keep = np.asarray(labels), np.asarray(keep)
  np.testing.assert_array_equal(labels[keep], probs.argmax(-1)[keep])
  assert np.all(labels[~keep] == 255) and not keep[0, 0].any()
  np.testing.assert_array_equal(keep, entropy_lib.entropy_percentile_mask(probs, valid,
                                                                          drop_percent=30.0))
  np.testing.assert_allclose(aux["selected_ratio"], keep.sum() / valid.sum(), rtol=1e-6)
  np.testing.assert_allclose(aux["entropy_threshold"], entropy_lib.entropy_threshold(
      probs, valid, drop_percent=30.0), rtol=1e-6)


def test_pmap_percentile_is_global():
  rng = np.random.default_rng(2)
  probs = _probs(rng, (8, 3, 4))
  valid = rng.random((8, 3, 4)) < 0.7
  single = entropy_lib.entropy_percentile_mask(probs, valid, drop_percent=25.0)
  sharded = jax.pmap(lambda p, v: entropy_lib.entropy_percentile_mask(
      p, v, drop_percent=25.0, axis_name="d"), axis_name="d")(
          probs[:, None], valid[:, None])
  np.testing.assert_array_equal(np.asarray(sharded)[:, 0], single)


def test_schedules_per_step_and_per_epoch():
  # Per step (paper): beta_t = 20 (1 - t / T) from start_step.
  f = jax.jit(lambda s: entropy_lib.dgcl_drop_percent(s, start_step=100, total_steps=1100))
  np.testing.assert_allclose([f(s) for s in (0, 100, 600, 1100, 5000)],
                             [20.0, 20.0, 10.0, 0.0, 0.0], rtol=1e-6)
  # Per epoch (official): 10 steps per epoch, warm-up epoch 1 of 6 -> progress (e - 1) / 5.
  kw = dict(start_step=10, total_steps=60, steps_per_epoch=10)
  beta = [float(entropy_lib.dgcl_drop_percent(s, **kw)) for s in (10, 19, 20, 35, 59)]
  np.testing.assert_allclose(beta, [20.0, 20.0, 16.0, 12.0, 4.0], rtol=1e-6)
  alpha = [float(entropy_lib.dgcl_contrastive_drop_percent(s, **kw)) for s in
           (10, 20, 30, 40, 50, 59)]
  # max(80 (1 - progress), 10): 80, 64, 48, 32, 16, 16 (last epoch: progress 4/5).
  np.testing.assert_allclose(alpha, [80.0, 64.0, 48.0, 32.0, 16.0, 16.0], rtol=1e-6)
  late = entropy_lib.dgcl_contrastive_drop_percent(95, start_step=0, total_steps=100)
  np.testing.assert_allclose(late, 10.0)  # floor alpha_min
  assert jnp.asarray(entropy_lib.dgcl_drop_percent(
      jnp.int32(5), start_step=0, total_steps=10)).dtype == jnp.float32
