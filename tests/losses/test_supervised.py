"""Pixel cross-entropy and OHEM against NumPy references written from their definitions."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semijax.losses import supervised


def _data(seed, b=2, h=5, w=6, c=4, ignore_frac=0.2):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(b, h, w, c)).astype(np.float32) * 2
  labels = rng.integers(0, c, size=(b, h, w))
  labels[rng.random((b, h, w)) < ignore_frac] = 255
  return logits, labels


def _np_nll(logits, labels):
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  safe = np.where(labels == 255, 0, labels)
  nll = -np.take_along_axis(logp, safe[..., None], -1)[..., 0]
  return np.where(labels == 255, 0.0, nll)


@pytest.mark.parametrize("reduction", supervised.REDUCTIONS)
def test_cross_entropy_matches_numpy(reduction):
  logits, labels = _data(0)
  mask = np.random.default_rng(1).random(labels.shape) > 0.3
  nll = _np_nll(logits, labels)
  sel = (labels != 255) & mask
  if reduction == "selected":
    ref = nll[sel].mean()
  elif reduction == "all":
    ref = nll[sel].sum() / labels.size
  else:
    ref = nll[sel].sum() / sel.sum() * labels.size / sel.sum()
  got, aux = supervised.cross_entropy_loss(logits, labels, mask, reduction=reduction)
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  np.testing.assert_allclose(aux["selected_ratio"], sel.mean(), rtol=1e-6)


def test_normalizer_mask_divides_by_its_pixels():
  logits, labels = _data(2)
  mask = np.random.default_rng(3).random(labels.shape) > 0.5
  pad = np.zeros(labels.shape, bool)
  pad[:, -2:] = True
  sel = (labels != 255) & mask
  ref = _np_nll(logits, labels)[sel].sum() / (~pad).sum()
  got, _ = supervised.cross_entropy_loss(logits, labels, mask, reduction="all",
                                         normalizer_mask=~pad)
  np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_empty_selection_gives_zero_and_finite_gradients():
  logits, labels = _data(4)
  labels[:] = 255
  value, grad = jax.value_and_grad(lambda x: supervised.cross_entropy_loss(x, labels)[0])(
      jnp.asarray(logits))
  assert float(value) == 0.0 and np.all(np.isfinite(grad))


def test_bf16_logits_give_float32_loss_and_gradients_check():
  logits, labels = _data(5)
  value, _ = supervised.cross_entropy_loss(jnp.asarray(logits, jnp.bfloat16), labels)
  assert value.dtype == jnp.float32
  chex.assert_numerical_grads(lambda x: supervised.cross_entropy_loss(x, labels)[0],
                              (jnp.asarray(logits, jnp.float32),), order=1, atol=1e-2,
                              rtol=1e-2)


def _np_ohem(logits, labels, thresh, min_kept):
  valid = labels != 255
  prob = np.exp(-_np_nll(logits, labels))
  p = prob[valid]
  if min_kept >= p.size:
    kept = valid
  else:
    threshold = thresh
    kth = np.sort(p)[min_kept - 1]
    if kth > thresh:
      threshold = kth
    kept = valid & (prob <= threshold)
  return _np_nll(logits, labels)[kept].mean()


@pytest.mark.parametrize("thresh,min_kept", [(0.7, 5), (0.2, 30), (0.9, 1000), (0.05, 10)])
def test_ohem_matches_numpy(thresh, min_kept):
  logits, labels = _data(6, b=2, h=8, w=8, c=5)
  got, _ = supervised.ohem_cross_entropy_loss(logits, labels, threshold=thresh,
                                              min_kept=min_kept)
  np.testing.assert_allclose(got, _np_ohem(logits, labels, thresh, min_kept), rtol=1e-5)


def test_losses_under_pmap_equal_global_value_and_gradient():
  logits, labels = _data(7, b=8, h=4, w=4, c=3)
  mask = np.random.default_rng(8).random(labels.shape) > 0.4

  def ce(x, y, m, axis_name=None):
    return supervised.cross_entropy_loss(x, y, m, reduction="u2pl", axis_name=axis_name)[0]

  def ohem(x, y, axis_name=None):
    return supervised.ohem_cross_entropy_loss(x, y, threshold=0.5, min_kept=20,
                                              axis_name=axis_name)[0]

  for fn, args in ((ce, (labels, mask)), (ohem, (labels,))):
    value, grad = jax.value_and_grad(fn)(jnp.asarray(logits), *args)
    pv, pg = jax.pmap(jax.value_and_grad(lambda x, *a: fn(x, *a, axis_name="d")),
                      axis_name="d")(logits.reshape(8, 1, 4, 4, 3),
                                     *[a.reshape(8, 1, 4, 4) for a in args])
    np.testing.assert_allclose(pv, np.full(8, value), rtol=1e-5)
    np.testing.assert_allclose(pg.reshape(logits.shape), grad, rtol=1e-4, atol=1e-7)


def test_jit_does_not_retrace():
  fn = jax.jit(chex.assert_max_traces(n=1)(lambda x, y: supervised.cross_entropy_loss(x, y)[0]))
  for seed in range(3):
    fn(*_data(seed))
