"""DSSN logit consistency and weak-to-strong CE vs NumPy references from the paper/code."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from semijax.losses import consistency as C

B, H, W, K = 8, 3, 4, 5


def _logits(seed):
  return np.random.default_rng(seed).normal(size=(B, H, W, K)).astype(np.float32) * 2.0


def _mask(seed=7):
  return np.random.default_rng(seed).random((B, H, W)) < 0.6


def np_standardized_mse(a, b, mask=None):
  """Official code: torch.std (unbiased) over classes, then MSELoss over B*C*H*W."""
  za = (a - a.mean(-1, keepdims=True)) / a.std(-1, ddof=1, keepdims=True)
  zb = (b - b.mean(-1, keepdims=True)) / b.std(-1, ddof=1, keepdims=True)
  sq = (za - zb) ** 2
  if mask is None:
    return sq.mean()
  return sq.mean(-1)[mask].mean() if mask.any() else 0.0


def np_l2(a, b, mask=None):
  """Paper eqs. 10/14: per image 1/(WH) sum_i ||h1_i - h2_i||^2, averaged over images."""
  d = ((a - b) ** 2).sum(-1)
  if mask is None:
    return np.mean([d[i].sum() / (H * W) for i in range(B)])
  return d[mask].mean() if mask.any() else 0.0


@pytest.mark.parametrize("form,ref", [("standardized_mse", np_standardized_mse), ("l2", np_l2)])
def test_matches_numpy(form, ref):
  a, b, mask = _logits(0), _logits(1), _mask()
  a64, b64 = a.astype(np.float64), b.astype(np.float64)
  loss, aux = C.logit_consistency_loss(a, b, form=form)
  np.testing.assert_allclose(loss, ref(a64, b64), rtol=1e-5)
  np.testing.assert_allclose(aux["selected_ratio"], 1.0)
  loss, aux = C.logit_consistency_loss(a, b, mask, form=form)
  np.testing.assert_allclose(loss, ref(a64, b64, mask), rtol=1e-5)
  np.testing.assert_allclose(aux["selected_ratio"], mask.mean(), rtol=1e-6)


def test_gradients_reach_both_views_and_check_grads():
  a, b, mask = _logits(2)[:2], _logits(3)[:2], _mask()[:2]
  for form in C.FORMS:
    f = jax.jit(lambda x, y, form=form: C.logit_consistency_loss(x, y, mask, form=form)[0])
    ga, gb = jax.grad(f, argnums=(0, 1))(a, b)
    assert np.abs(ga).sum() > 0 and np.abs(gb).sum() > 0
    # Central differences in float32 (the loss computes in float32 whatever the input):
    # a step of 1e-2 balances round-off against truncation; tolerances are check_grads'.
    jax.test_util.check_grads(f, (a, b), order=1, modes=["rev"], eps=1e-2)
  # Symmetric loss: the two views receive opposite-signed partners of the same size.
  ga, gb = jax.grad(lambda x, y: C.logit_consistency_loss(x, y, form="l2")[0],
                    argnums=(0, 1))(a, b)
  np.testing.assert_allclose(ga, -gb, rtol=1e-6)


def test_empty_mask_constant_pixels_and_dtype():
  a, b = _logits(4), _logits(5)
  empty = np.zeros((B, H, W), bool)
  for form in C.FORMS:
    value, grads = jax.jit(jax.value_and_grad(
        lambda x, y, form=form: C.logit_consistency_loss(x, y, empty, form=form)[0],
        argnums=(0, 1)))(a, b)
    assert float(value) == 0.0
    assert all(np.all(np.isfinite(g)) and not np.any(g) for g in grads)
    loss, _ = C.logit_consistency_loss(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), form=form)
    assert loss.dtype == jnp.float32
  # A pixel whose logits are constant standardises to 0 (official: NaN); finite grads.
  a[0, 0, 0] = 1.5
  value, grad = jax.jit(jax.value_and_grad(lambda x: C.logit_consistency_loss(x, b)[0]))(a)
  assert np.isfinite(value) and np.all(np.isfinite(grad))
  np.testing.assert_array_equal(C.standardize_logits(a)[0, 0, 0], 0.0)


def test_pmap_gives_global_value_and_gradient_shares():
  a, b, mask = _logits(6), _logits(7), _mask(8)

  def both_forms(x, y, m, axis_name=None):
    return {form: jax.value_and_grad(
        lambda u, form=form: C.logit_consistency_loss(u, y, m, form=form,
                                                      axis_name=axis_name)[0])(x)
            for form in C.FORMS}

  want = jax.jit(both_forms)(a, b, mask)
  got = jax.pmap(lambda x, y, m: both_forms(x, y, m, "d"), axis_name="d")(
      a[:, None], b[:, None], mask[:, None])
  for form in C.FORMS:
    (value, grad), (pv, pg) = want[form], got[form]
    np.testing.assert_allclose(pv, np.full(B, value), rtol=1e-6)
    np.testing.assert_allclose(pg[:, 0], grad, rtol=1e-5, atol=1e-8)


def test_jit_over_mesh_and_no_retrace(mesh8):
  a, b, mask = _logits(9), _logits(10), _mask(11)
  want, _ = C.logit_consistency_loss(a, b, mask)
  sharding = NamedSharding(mesh8, P("data"))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(x, y, m):
    return C.logit_consistency_loss(x, y, m)

  got, _ = f(*(jax.device_put(v, sharding) for v in (a, b, mask)))
  f(*(jax.device_put(v, sharding) for v in (b, a, ~mask)))
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_weak_to_strong_loss_matches_official_normalisation():
  logits, labels = _logits(12), np.random.default_rng(13).integers(0, K, (B, H, W))
  mask, pad = _mask(14), np.zeros((B, H, W), bool)
  pad[:, 2:, :] = True
  w2s = jax.jit(chex.assert_max_traces(C.weak_to_strong_loss, n=1))
  w2s(logits + 1.0, labels, ~mask, valid=~pad)
  loss, aux = w2s(logits, labels, mask, valid=~pad)
  z = logits.astype(np.float64)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, labels[..., None], -1)[..., 0]
  sel = mask & ~pad
  np.testing.assert_allclose(loss, nll[sel].sum() / (~pad).sum(), rtol=1e-5)
  np.testing.assert_allclose(aux["selected_ratio"], sel.sum() / (~pad).sum(), rtol=1e-6)
  value, grad = jax.jit(jax.value_and_grad(
      lambda x: C.weak_to_strong_loss(x, labels, np.zeros_like(mask), valid=~pad)[0]))(logits)
  assert float(value) == 0.0 and np.all(np.isfinite(grad)) and not np.any(grad)
