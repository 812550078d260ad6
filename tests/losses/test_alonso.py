"""Alonso et al. losses against NumPy references of eqs. 3, 7, 8-11; empty cases, devices."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from semijax.losses import alonso, supervised
from semijax.pseudo import sharpened

C, K, D = 4, 6, 5

pytestmark = pytest.mark.usefixtures("fast_compiles")


def _unit(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def np_contrastive(p, y, bank, bank_valid, s_p=None, s_z=None, *, reduction="present",
                   min_p=2, min_z=2):
  """Eqs. 8-11 literally: per class the |P_c| x |Z'_c| matrix of w_p w_z (1 - cos)."""
  p = p.astype(np.float64)
  terms, num = [], 0
  for c in range(bank.shape[0]):
    sel = y == c
    pc = p[sel]
    zc = bank[c][bank_valid[c]].astype(np.float64)
    if len(pc) < min_p or len(zc) < min_z:
      continue
    num += 1
    sp = np.ones(len(pc)) if s_p is None else s_p[sel].astype(np.float64)
    sz = np.ones(len(zc)) if s_z is None else s_z[c][bank_valid[c]].astype(np.float64)
    wp = len(pc) / sp.sum() * sp  # eq. 8
    wz = len(zc) / sz.sum() * sz
    dist = wp[:, None] * wz[None, :] * (1 - _unit(pc) @ _unit(zc).T)  # eqs. 9-10
    terms.append(dist.mean())  # eq. 11: 1/|P_c| 1/|Z'_c| sum sum
  if not terms:
    return 0.0
  return float(np.sum(terms) / (num if reduction == "present" else bank.shape[0]))


def make_inputs(rng, n=40, fill=(K, 3, 1, K)):
  p = rng.normal(size=(n, D)).astype(np.float32)
  y = rng.integers(0, C, n)
  y[rng.random(n) < 0.2] = 255
  y[y == 3] = 0
  y[:1] = 3  # class 3: one vector only (below min_predictions)
  bank = rng.normal(size=(C, K, D)).astype(np.float32)
  bank_valid = np.arange(K)[None, :] < np.asarray(fill)[:, None]  # class 2: one entry
  s_p = rng.uniform(0.05, 0.95, n).astype(np.float32)
  s_z = rng.uniform(0.05, 0.95, (C, K)).astype(np.float32)
  return p, y, bank, bank_valid, s_p, s_z


_loss = jax.jit(alonso.class_contrastive_loss,
                static_argnames=("class_reduction", "min_predictions", "min_bank"))


@pytest.mark.parametrize("reduction", ["present", "all"])
@pytest.mark.parametrize("weighted", [True, False])
def test_contrastive_loss_matches_numpy(reduction, weighted):
  rng = np.random.default_rng(0)
  p, y, bank, bv, s_p, s_z = make_inputs(rng)
  if not weighted:
    s_p = s_z = None
  loss, aux = _loss(p, y, bank, bv, s_p, s_z, class_reduction=reduction)
  want = np_contrastive(p, y, bank, bv, s_p, s_z, reduction=reduction)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  assert float(aux["num_classes"]) == 2.0  # classes 0 and 1 (2: one entry, 3: one vector)
  sel = aux["selection"]
  np.testing.assert_array_equal(np.asarray(sel["valid"]), np.isin(y, [0, 1]))


def test_attention_weights_match_eq8():
  rng = np.random.default_rng(1)
  s = rng.uniform(0.1, 0.9, 30).astype(np.float32)
  g = rng.integers(0, C + 1, 30)  # C = out of range
  v = rng.random(30) < 0.8
  w, counts = alonso.attention_weights(s, g, v, num_groups=C)
  for c in range(C):
    m = v & (g == c)
    assert counts[c] == m.sum()
    if m.any():
      np.testing.assert_allclose(np.asarray(w)[m], m.sum() * s[m] / s[m].sum(), rtol=1e-6)
      np.testing.assert_allclose(np.asarray(w)[m].mean(), 1.0, rtol=1e-6)
  assert np.all(np.asarray(w)[~(v & (g < C))] == 0)
  bw = np.asarray(alonso.bank_weights(rng.uniform(0.1, 0.9, (C, K)),
                                      np.broadcast_to(np.arange(K) < 4, (C, K))))
  np.testing.assert_allclose(bw[:, :4].mean(1), 1.0, rtol=1e-6)
  assert np.all(bw[:, 4:] == 0)


def test_gradients_reach_predictions_and_both_scores():
  rng = np.random.default_rng(2)
  p, y, bank, bv, s_p, s_z = make_inputs(rng)
  f = lambda p, sp, sz: _loss(p, y, bank, bv, sp, sz)[0]  # noqa: E731
  gp, gsp, gsz = jax.grad(f, argnums=(0, 1, 2))(p, s_p, s_z)
  used = np.isin(y, [0, 1])
  assert np.all(np.abs(np.asarray(gp)[used]).sum(1) > 0)
  assert np.all(np.asarray(gp)[~used] == 0)
  assert np.all(np.asarray(gsp)[used] != 0) and np.all(np.asarray(gsp)[~used] == 0)
  gsz = np.asarray(gsz)
  assert np.all(gsz[:2][bv[:2]] != 0) and np.all(gsz[2:] == 0) and np.all(gsz[~bv] == 0)
  jax.test_util.check_grads(lambda p, sp, sz: alonso.class_contrastive_loss(
      p, y, bank, bv, sp, sz)[0], (p, s_p, s_z), order=1, modes=["rev"])


def test_empty_selection_and_empty_bank_give_zero_with_finite_grads():
  rng = np.random.default_rng(3)
  p, y, bank, bv, s_p, s_z = make_inputs(rng)
  f = lambda p, y, bv: _loss(p, y, bank, bv, s_p, s_z)  # noqa: E731
  for labels, valid in ((np.full_like(y, 255), bv), (y, np.zeros_like(bv))):
    (loss, aux), g = jax.value_and_grad(lambda p, y=labels, v=valid: f(p, y, v),
                                        has_aux=True)(p)
    assert float(loss) == 0.0 and float(aux["num_classes"]) == 0.0
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g) == 0)


def test_bf16_in_f32_out_and_no_retrace():
  rng = np.random.default_rng(4)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(p, y, bank, bv, sp, sz):
    return alonso.class_contrastive_loss(p, y, bank, bv, sp, sz)[0]

  for i in range(3):
    p, y, bank, bv, s_p, s_z = make_inputs(np.random.default_rng(10 + i))
    value = step(jnp.asarray(p, jnp.bfloat16), y, bank, bv, s_p, s_z)
    assert value.dtype == jnp.float32 and np.isfinite(float(value)) and float(value) > 0
  del rng


# Devices: pmap with axis_name, shard_map with axis_name, jit over a mesh.


def _device_inputs():
  rng = np.random.default_rng(5)
  p, y, bank, bv, s_p, s_z = make_inputs(rng, n=64)
  return p, y, bank, bv, s_p, s_z


def _value_and_grads(p, y, bank, bv, sp, sz, axis_name=None):
  return jax.value_and_grad(lambda p, sp, sz: alonso.class_contrastive_loss(
      p, y, bank, bv, sp, sz, axis_name=axis_name)[0], argnums=(0, 1, 2))(p, sp, sz)


def test_pmap_matches_global_batch():
  p, y, bank, bv, s_p, s_z = _device_inputs()
  value, (gp, gsp, gsz) = jax.jit(_value_and_grads)(p, y, bank, bv, s_p, s_z)
  split = lambda x: x.reshape((8, -1) + x.shape[1:])  # noqa: E731
  fn = jax.pmap(functools.partial(_value_and_grads, axis_name="d"), axis_name="d",
                in_axes=(0, 0, None, None, 0, None))
  pv, (pgp, pgsp, pgsz) = fn(split(p), split(y), bank, bv, split(s_p), s_z)
  np.testing.assert_allclose(pv, np.full(8, value), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(pgp).reshape(p.shape), gp, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(pgsp).reshape(-1), gsp, rtol=1e-5, atol=1e-7)
  # The bank scores are replicated: the per-device shares sum to the global gradient.
  np.testing.assert_allclose(np.asarray(pgsz).sum(0), gsz, rtol=1e-5, atol=1e-7)
  assert float(value) > 0


def test_shard_map_and_mesh_jit_match_global_batch(mesh8):
  p, y, bank, bv, s_p, s_z = _device_inputs()
  value, (gp, gsp, gsz) = jax.jit(_value_and_grads)(p, y, bank, bv, s_p, s_z)

  def per_device(p, y, sp, bank, bv, sz):
    v, g = _value_and_grads(p, y, bank, bv, sp, sz, axis_name="data")
    return v[None], g

  fn = jax.shard_map(per_device, mesh=mesh8,
                     in_specs=(P("data"), P("data"), P("data"), P(), P(), P()),
                     out_specs=(P("data"), (P("data"), P("data"), P())))
  shard = lambda x: jax.device_put(x, NamedSharding(mesh8, P("data")))  # noqa: E731
  sv, (sgp, sgsp, sgsz) = jax.jit(fn)(shard(p), shard(y), shard(s_p), bank, bv, s_z)
  np.testing.assert_allclose(sv, np.full(8, value), rtol=1e-6)
  np.testing.assert_allclose(sgp, gp, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(sgsp, gsp, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(sgsz, gsz, rtol=1e-5, atol=1e-7)
  mv, (mgp, _, _) = jax.jit(_value_and_grads)(shard(p), shard(y), bank, bv, shard(s_p), s_z)
  np.testing.assert_allclose(mv, value, rtol=1e-6)
  np.testing.assert_allclose(mgp, gp, rtol=1e-5, atol=1e-7)


# Eq. 7: entropy minimisation.


def np_entropy(logits, mask=None, normalize=True):
  z = logits.astype(np.float64)
  prob = np.exp(z - z.max(-1, keepdims=True))
  prob /= prob.sum(-1, keepdims=True)
  ent = -(prob * np.log(prob)).sum(-1)  # eq. 7, nats
  if normalize:
    ent /= math.log(logits.shape[-1])
  if mask is None:
    return ent.mean()
  return ent[mask].mean() if mask.any() else 0.0


def test_entropy_matches_eq7_and_the_official_normalisation():
  rng = np.random.default_rng(6)
  logits = rng.normal(size=(3, 5, 6, 7)).astype(np.float32) * 3
  mask = rng.random((3, 5, 6)) < 0.7
  for m in (None, mask):
    for normalize in (True, False):
      got, _ = alonso.entropy_loss(logits, m, normalize=normalize)
      np.testing.assert_allclose(float(got), np_entropy(logits, m, normalize), rtol=1e-5)
  # Official `entropy_loss`: -sum(v log2 v mask) / (n h w log2(C) mean(mask)).
  prob = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  official = -np.sum((prob * np.log2(prob + 1e-30)).sum(-1) * mask) / (
      mask.size * np.log2(7) * mask.mean())
  np.testing.assert_allclose(float(alonso.entropy_loss(logits, mask)[0]), official, rtol=1e-5)
  loss, g = jax.value_and_grad(lambda x: alonso.entropy_loss(x, np.zeros_like(mask))[0])(logits)
  assert float(loss) == 0.0 and np.all(np.asarray(g) == 0)
  jax.test_util.check_grads(lambda x: alonso.entropy_loss(x, mask)[0], (logits,), order=1,
                            modes=["rev"])


# Eq. 3: the weighted cross-entropy with the sharpened per-pixel and class-balancing weights.


def test_eq3_weighted_cross_entropy():
  rng = np.random.default_rng(7)
  logits = rng.normal(size=(2, 4, 5, C)).astype(np.float32) * 2
  labels = rng.integers(0, C, (2, 4, 5))
  labels[0, 0] = 255
  teacher = rng.normal(size=(2, 4, 5, C)).astype(np.float32) * 3
  probs = np.exp(teacher) / np.exp(teacher).sum(-1, keepdims=True)
  y_hat, beta, aux = sharpened.sharpened_confidence(probs, power=6.0)
  np.testing.assert_array_equal(y_hat, probs.argmax(-1))
  np.testing.assert_allclose(beta, probs.max(-1) ** 6, rtol=1e-5)
  alpha = rng.uniform(0.5, 2.0, C).astype(np.float32)
  # H(y1, y2) = -1/N sum_n sum_c y2 log y1 alpha_c beta_n, N = every pixel (official).
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  onehot = np.eye(C)[np.where(labels == 255, 0, labels)] * (labels != 255)[..., None]
  want = -(onehot * logp * alpha).sum(-1) * np.asarray(beta)
  want = want.sum() / labels.size
  mask = np.asarray(beta) * alpha[np.clip(labels, 0, C - 1)]
  got, _ = supervised.cross_entropy_loss(logits, labels, mask, reduction="all")
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  assert 0 < float(aux["mean_weight"]) < float(aux["mean_confidence"]) <= 1


def test_class_balance_weights_match_the_official_rule():
  f = np.array([1000.0, 10.0, 0.0, 250.0, 40.0])
  med = np.median(f)
  w = med / np.where(f > 0, f, np.nan)
  w[np.isnan(w)] = 1
  w[f == 0] = w.max()
  np.testing.assert_allclose(alonso.class_balance_weights(f), np.sqrt(w), rtol=1e-6)


def test_frequency_window_follows_class_balancing():
  rng = np.random.default_rng(8)
  n_l, n_u, c = 2, 3, 4
  window = alonso.frequency_window_init(c, n_l, n_u)
  lab_rows, unl_rows = [], []
  update = jax.jit(alonso.frequency_window_update)
  for t in range(6):
    lab = rng.integers(0, c + 1, (2, 3, 3))
    unl = rng.integers(0, c, (2, 3, 3))
    window = update(window, lab, unl)
    counts = lambda x: np.array([(x == k).sum() for k in range(c)], np.float32)  # noqa: E731
    if t < n_l:
      lab_rows.append(counts(lab))
    unl_rows = (unl_rows + [counts(unl)])[-n_u:]
    weights = np.asarray(alonso.frequency_window_weights(window))
    if t + 1 < max(n_l, n_u):
      np.testing.assert_array_equal(weights, 1.0)
    else:
      freqs = np.sum(lab_rows, 0) + np.sum(unl_rows, 0)
      np.testing.assert_allclose(weights, alonso.class_balance_weights(freqs), rtol=1e-6)


def _entropy_balance_sharpened(logits, labels, pseudo, window, axis_name=None):
  """Eq. 7, the class-frequency window and the sharpened weights on one shard or the batch."""
  mask = labels != 255
  (ent, _), grad = jax.value_and_grad(
      lambda x: alonso.entropy_loss(x, mask, axis_name=axis_name), has_aux=True)(logits)
  window = alonso.frequency_window_update(window, labels, pseudo, axis_name=axis_name)
  counts = alonso.class_counts(pseudo, C, axis_name=axis_name)
  _, beta, aux = sharpened.sharpened_confidence(jax.nn.softmax(logits), power=6.0,
                                                axis_name=axis_name)
  return {"entropy": ent, "grad": grad, "labeled": window.labeled,
          "unlabeled": window.unlabeled, "counts": counts, "beta": beta,
          "mean_weight": aux["mean_weight"]}


def test_entropy_class_counts_and_sharpened_under_pmap():
  rng = np.random.default_rng(9)
  logits = rng.normal(size=(8, 3, 4, C)).astype(np.float32) * 2
  labels = rng.integers(0, C + 1, (8, 3, 4))
  labels[labels == C] = 255
  pseudo = rng.integers(0, C, (8, 3, 4))
  window = alonso.frequency_window_init(C, 2, 3)
  want = jax.jit(_entropy_balance_sharpened)(logits, labels, pseudo, window)
  got = jax.pmap(lambda a, b, c: _entropy_balance_sharpened(a, b, c, window, axis_name="d"),
                 axis_name="d")(logits[:, None], labels[:, None], pseudo[:, None])
  for key in ("entropy", "mean_weight"):  # global scalars, the same on every device
    np.testing.assert_allclose(got[key], np.full(8, want[key]), rtol=1e-5, err_msg=key)
  for key in ("labeled", "unlabeled", "counts"):  # global counts, replicated
    for dev in range(8):
      np.testing.assert_array_equal(np.asarray(got[key])[dev], want[key], err_msg=key)
  for key in ("grad", "beta"):  # the device's own rows
    np.testing.assert_allclose(np.asarray(got[key]).reshape(np.shape(want[key])), want[key],
                               rtol=1e-5, atol=1e-8, err_msg=key)
