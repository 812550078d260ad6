"""CSC losses (eqs. 5-6, Algorithm 1): NumPy references, fallback, filter, empty cases, devices."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from semijax.banks import csc as csc_bank
from semijax.losses import csc

pytestmark = pytest.mark.usefixtures("fast_compiles")

C, D, TAU = 4, 6, 0.2


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def np_contrastive(anchors, alab, avalid, keys, klab, kvalid, self_idx=None, *, top_n, tau,
                   reduction="sum", keep=None):
  """Eqs. 5 (top_n=None) and 6 with explicit loops and boolean indexing, in float64.

  `keep`: optional bool mask of queries whose term enters the mean (the unlabeled filter).
  """
  a, k = _unit(anchors), _unit(keys)
  m = len(keys)
  per = []
  for i in range(len(anchors)):
    if not avalid[i] or alab[i] == 255 or (keep is not None and not keep[i]):
      continue
    sims = k @ a[i] / tau
    usable = kvalid & (klab != 255)
    not_self = np.arange(m) != (-1 if self_idx is None else self_idx[i])
    pos = np.nonzero(usable & (klab == alab[i]) & not_self)[0]
    neg = np.nonzero(usable & (klab != alab[i]))[0]
    if len(pos) == 0:
      continue
    ranked = pos[np.argsort(-sims[pos], kind="stable")]
    chosen = ranked if top_n is None else ranked[:top_n]
    terms = [-np.log(np.exp(sims[j]) / (np.exp(sims[j]) + np.exp(sims[neg]).sum()))
             for j in chosen]
    per.append(np.sum(terms) if reduction == "sum" else np.mean(terms))
  return float(np.mean(per)) if per else 0.0


def random_sets(rng, a=10, m=14):
  anchors = rng.normal(size=(a, D)).astype(np.float32)
  keys = rng.normal(size=(m, D)).astype(np.float32)
  alab = rng.integers(0, C, a).astype(np.int32)
  klab = rng.integers(0, C, m).astype(np.int32)
  klab[0] = 255   # an ignored key
  avalid = rng.random(a) < 0.8
  kvalid = rng.random(m) < 0.8
  return anchors, alab, avalid, keys, klab, kvalid


_topn = jax.jit(csc.topn_contrastive_loss,
                static_argnames=("top_n", "temperature", "positive_reduction"))


@pytest.mark.parametrize("top_n", [1, 2, 3])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_topn_loss_matches_numpy(top_n, reduction):
  rng = np.random.default_rng(0)
  anchors, alab, avalid, keys, klab, kvalid = random_sets(rng)
  loss, aux = _topn(anchors, alab, avalid, keys, klab, kvalid, top_n=top_n, temperature=TAU,
                    positive_reduction=reduction)
  want = np_contrastive(anchors, alab, avalid, keys, klab, kvalid, top_n=top_n, tau=TAU,
                        reduction=reduction)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  assert 0 < float(aux["num_anchors"]) <= avalid.sum()


def test_pixel_loss_matches_numpy_and_topn_all_positives_is_pixel_loss():
  rng = np.random.default_rng(1)
  anchors, alab, avalid, keys, klab, kvalid = random_sets(rng, a=12, m=20)
  for reduction in ("sum", "mean"):
    lp, _ = jax.jit(functools.partial(csc.pixel_contrastive_loss, temperature=TAU,
                                      positive_reduction=reduction))(
                                          anchors, alab, avalid, keys, klab, kvalid)
    want = np_contrastive(anchors, alab, avalid, keys, klab, kvalid, top_n=None, tau=TAU,
                          reduction=reduction)
    np.testing.assert_allclose(lp, want, rtol=1e-5)
    # TopN with N >= the largest positive set is L_p (eq. 6 reduces to eq. 5).
    lc, _ = _topn(anchors, alab, avalid, keys, klab, kvalid, top_n=len(keys), temperature=TAU,
                  positive_reduction=reduction)
    np.testing.assert_allclose(lc, lp, rtol=1e-6)
  # ... and N = 1 is not (the sets have several positives per query).
  l1, _ = _topn(anchors, alab, avalid, keys, klab, kvalid, top_n=1, temperature=TAU)
  assert abs(float(l1) - float(lp)) > 1e-3


def test_self_is_never_a_positive():
  rng = np.random.default_rng(2)
  anchors, alab, avalid, _, _, _ = random_sets(rng, a=9)
  keys = anchors.copy()
  self_idx = np.arange(9, dtype=np.int32)
  loss, _ = _topn(anchors, alab, np.ones(9, bool), keys, alab, np.ones(9, bool),
                  anchor_key_index=self_idx, top_n=1, temperature=TAU)
  want = np_contrastive(anchors, alab, np.ones(9, bool), keys, alab, np.ones(9, bool),
                        self_idx, top_n=1, tau=TAU)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  # Without the exclusion the query's own copy would be its top-1 positive (cosine 1).
  loss_self, aux = _topn(anchors, alab, np.ones(9, bool), keys, alab, np.ones(9, bool),
                         top_n=1, temperature=TAU)
  np.testing.assert_allclose(aux["pos_sim_mean"], 1.0, rtol=1e-6)
  assert float(loss_self) < float(loss)


def test_empty_selections_give_zero_with_finite_grads():
  rng = np.random.default_rng(3)
  anchors, alab, _, keys, klab, kvalid = random_sets(rng)

  @jax.jit
  @functools.partial(jax.value_and_grad, argnums=(0, 1))
  def f(a, k, avalid, kvalid):
    return csc.topn_contrastive_loss(a, alab, avalid, k, klab, kvalid, top_n=1,
                                     temperature=TAU)[0]

  for avalid, kv in ((np.zeros(len(anchors), bool), kvalid),     # no query
                     (np.ones(len(anchors), bool), np.zeros_like(kvalid))):   # no key
    loss, (ga, gk) = f(anchors, keys, avalid, kv)
    assert float(loss) == 0.0
    np.testing.assert_array_equal(ga, 0.0)
    np.testing.assert_array_equal(gk, 0.0)
  # Positives but no negative: -log(E / E) = 0, finite gradients.
  one_class = np.zeros_like(klab)
  loss, grads = jax.value_and_grad(lambda a: csc.topn_contrastive_loss(
      a, np.zeros_like(alab), np.ones(len(anchors), bool), keys, one_class,
      np.ones(len(keys), bool), top_n=2, temperature=TAU)[0])(anchors)
  assert float(loss) == 0.0 and np.all(np.isfinite(grads))


def test_numerical_gradients():
  rng = np.random.default_rng(4)
  anchors, alab, avalid, keys, klab, kvalid = random_sets(rng, a=6, m=9)
  for top_n in (1, None):
    f = jax.jit(lambda a, k, n=top_n: csc.topn_contrastive_loss(
        a, alab, avalid, k, klab, kvalid, top_n=n, temperature=0.5)[0])
    jax.test_util.check_grads(f, (jnp.asarray(anchors), jnp.asarray(keys)), order=1,
                              modes=["rev"], atol=2e-3, rtol=2e-3)


def test_bf16_inputs_give_f32_and_no_retrace():
  rng = np.random.default_rng(5)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(a, k, avalid):
    return csc.topn_contrastive_loss(a, alab, avalid, k, klab, kvalid, top_n=1,
                                     temperature=TAU)[0]

  anchors, alab, avalid, keys, klab, kvalid = random_sets(rng)
  for _ in range(3):
    loss = step(jnp.asarray(rng.normal(size=anchors.shape), jnp.bfloat16),
                jnp.asarray(rng.normal(size=keys.shape), jnp.bfloat16), rng.random(10) < 0.7)
    assert loss.dtype == jnp.float32 and np.isfinite(float(loss))


def test_unlabeled_keep_fraction_schedule():
  # The code's UnlabelFilter('log'): p = 0.1 + 0.8 log(1 + t) / log(1 + T).
  for t in (0, 1, 10, 500, 1000):
    got = float(csc.unlabeled_keep_fraction(t + 20, total_steps=1020, start_step=20))
    np.testing.assert_allclose(got, 0.1 + 0.8 * math.log(1 + t) / math.log(1 + 1000),
                               rtol=1e-6)
  assert float(csc.unlabeled_keep_fraction(5, total_steps=100, start_step=20)) == \
      pytest.approx(0.1)
  np.testing.assert_allclose(csc.unlabeled_keep_fraction(50, total_steps=100, schedule="linear"),
                             0.5, rtol=1e-6)
  with pytest.raises(ValueError, match="schedule"):
    csc.unlabeled_keep_fraction(0, total_steps=10, schedule="cosine")


# ------------------------------------------------------------------------------------------
# The composed loss: semi-hard queries, [queries ; bank], fallback and the unlabeled filter.

B, H, W = 8, 4, 4
VIEWS = (2, 3, 2, 2)
KW = dict(views=VIEWS, max_anchors=256, temperature=TAU, chunk_size=32)


def make_batch(rng):
  feats = rng.normal(size=(B, H, W, D)).astype(np.float32)
  labels = rng.integers(0, C, (B, H, W)).astype(np.int32)
  labels[rng.random((B, H, W)) < 0.15] = 255
  preds = np.where(rng.random((B, H, W)) < 0.6, labels, rng.integers(0, C, (B, H, W)))
  return feats, labels, np.where(preds == 255, 0, preds).astype(np.int32)


def make_bank(rng, count=(5, 5, 5, 5), k=5):
  return csc_bank.from_contents(_unit(rng.normal(size=(C, k, D))).astype(np.float32),
                                np.asarray(count))


_vg = jax.jit(jax.value_and_grad(csc.csc_contrastive_loss, has_aux=True),
              static_argnames=tuple(KW) + ("top_n", "empty_bank", "positive_reduction",
                                           "detach_batch_keys"))


def _reference_for_selection(feats, bank, sel, *, top_n, use_bank, reduction="mean",
                             keep=None):
  """Eq. 5/6 on the drawn queries against [queries ; bank entries] (NumPy)."""
  idx, valid, labels = (np.asarray(x) for x in (sel.pixel_index, sel.valid, sel.labels))
  anchors = feats.reshape(-1, D)[idx]
  keys, klab, kvalid = anchors, labels, valid
  if use_bank:
    bf, bl, bv = (np.asarray(x) for x in csc_bank.contents(bank))
    keys, klab, kvalid = (np.concatenate([keys, bf]), np.concatenate([klab, bl]),
                          np.concatenate([kvalid, bv]))
  return np_contrastive(anchors, labels, valid, keys, klab, kvalid, np.arange(len(idx)),
                        top_n=top_n, tau=TAU, reduction=reduction, keep=keep)


def test_composed_loss_matches_numpy_on_its_selection_and_grads_reach_queries_only():
  rng = np.random.default_rng(6)
  feats, labels, preds = make_batch(rng)
  bank = make_bank(rng)
  (loss, aux), grad = _vg(feats, labels, preds, bank, jax.random.key(0), **KW)
  sel = aux["selection"]
  want = _reference_for_selection(feats, bank, sel, top_n=1, use_bank=True)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  assert float(aux["bank_used"]) == 1.0 and float(aux["anchors_capped"]) == 0.0
  assert 0 < float(aux["positive_from_bank"]) < 1
  # The queries (and only they) receive gradient: they are both anchors and batch keys.
  touched = np.zeros(B * H * W, bool)
  touched[np.asarray(sel.pixel_index)[np.asarray(sel.valid)]] = True
  g = np.abs(np.asarray(grad)).reshape(-1, D).sum(1)
  assert np.all(g[~touched] == 0) and np.all(g[touched] > 0)
  # One block for all queries instead of blocks of 32 (the memory knob): the same result.
  (loss_c, _), grad_c = _vg(feats, labels, preds, bank, jax.random.key(0),
                            **{**KW, "chunk_size": None})
  np.testing.assert_allclose(loss_c, loss, rtol=1e-6)
  np.testing.assert_allclose(grad_c, grad, rtol=1e-5, atol=1e-7)
  # Detached batch keys: same value, other gradient.
  (loss_d, _), grad_d = _vg(feats, labels, preds, bank, jax.random.key(0),
                            detach_batch_keys=True, **KW)
  np.testing.assert_allclose(loss_d, loss, rtol=1e-6)
  assert np.abs(np.asarray(grad_d) - np.asarray(grad)).max() > 1e-6


@pytest.mark.parametrize("empty_bank", ["topn", "pixel"])
def test_fallback_while_a_class_bank_is_empty(empty_bank):
  rng = np.random.default_rng(7)
  feats, labels, preds = make_batch(rng)
  partial = make_bank(rng, count=(5, 0, 5, 3))   # class 1 empty
  (loss, aux), grad = _vg(feats, labels, preds, partial, jax.random.key(1),
                          empty_bank=empty_bank, **KW)
  assert float(aux["bank_used"]) == 0.0 and float(aux["positive_from_bank"]) == 0.0
  # Algorithm 1: L_p on the batch ('pixel'); the code keeps TopN on the batch ('topn').
  want = _reference_for_selection(feats, partial, aux["selection"], use_bank=False,
                                  top_n=None if empty_bank == "pixel" else 1)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  assert np.all(np.isfinite(grad))
  # Once every class has an entry, the bank is used with TopN.
  full = make_bank(rng, count=(5, 1, 5, 3))
  (loss, aux), _ = _vg(feats, labels, preds, full, jax.random.key(1), empty_bank=empty_bank,
                       **KW)
  assert float(aux["bank_used"]) == 1.0
  np.testing.assert_allclose(
      loss, _reference_for_selection(feats, full, aux["selection"], use_bank=True, top_n=1),
      rtol=1e-5)
  # No bank at all: the in-batch contrast (the "bank off" ablation).
  (loss, aux), _ = _vg(feats, labels, preds, None, jax.random.key(1), **KW)
  np.testing.assert_allclose(
      loss, _reference_for_selection(feats, None, aux["selection"], use_bank=False, top_n=1),
      rtol=1e-5)


def test_top_n_none_uses_every_positive_with_the_bank():
  rng = np.random.default_rng(8)
  feats, labels, preds = make_batch(rng)
  bank = make_bank(rng)
  for reduction in ("mean", "sum"):
    (loss, aux), _ = _vg(feats, labels, preds, bank, jax.random.key(2), top_n=None,
                         positive_reduction=reduction, **KW)
    np.testing.assert_allclose(loss, _reference_for_selection(
        feats, bank, aux["selection"], top_n=None, use_bank=True, reduction=reduction),
        rtol=1e-5)


def test_unlabeled_filter_drops_the_lowest_positive_logit_sums():
  rng = np.random.default_rng(9)
  feats, labels, preds = make_batch(rng)
  bank = make_bank(rng)
  p = 0.6
  (loss, aux), _ = _vg(feats, labels, preds, bank, jax.random.key(3), keep_fraction=p, **KW)
  sel = aux["selection"]
  idx, valid, lab = (np.asarray(x) for x in (sel.pixel_index, sel.valid, sel.labels))
  # The code: logits = z.[X ; bank] / tau minus the row max; score = sum over positives.
  a = _unit(feats.reshape(-1, D)[idx])
  bf, bl, bv = (np.asarray(x) for x in csc_bank.contents(bank))
  keys = np.concatenate([a, _unit(bf)])
  klab, kvalid = np.concatenate([lab, bl]), np.concatenate([valid, bv])
  logits = a @ keys.T / TAU
  scores = np.full(len(idx), np.inf)
  for i in np.nonzero(valid)[0]:
    usable = kvalid.copy()
    usable[i] = True
    row = logits[i] - logits[i][usable].max()
    pos = kvalid & (klab == lab[i]) & (np.arange(len(keys)) != i)
    scores[i] = row[pos].sum()
  n_drop = math.ceil((1 - p) * valid.sum())
  keep = valid.copy()
  keep[np.argsort(scores, kind="stable")[:n_drop]] = False
  assert float(aux["anchors_filtered"]) == n_drop
  want = _reference_for_selection(feats, bank, sel, top_n=1, use_bank=True, keep=keep)
  np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_cap_nothing_drawn_and_no_retrace():
  rng = np.random.default_rng(10)
  feats, labels, preds = make_batch(rng)
  bank = make_bank(rng)
  (loss, aux), _ = _vg(feats, labels, preds, bank, jax.random.key(4),
                       **{**KW, "max_anchors": 16})
  assert float(aux["num_anchors"]) == 16 and float(aux["anchors_capped"]) > 0
  assert np.isfinite(float(loss))
  # Nothing labelled: exactly 0 with zero gradients.
  (loss, aux), grad = _vg(feats, np.full_like(labels, 255), preds, bank, jax.random.key(4),
                          **KW)
  assert float(loss) == 0.0 and float(aux["num_anchors"]) == 0.0
  np.testing.assert_array_equal(grad, 0.0)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(f, l, p, bank, key):
    return csc.csc_contrastive_loss(f, l, p, bank, key, empty_bank="pixel", keep_fraction=0.5,
                                    **KW)[0]

  for i, count in enumerate([(5, 0, 5, 5), (5, 5, 5, 5), (1, 2, 3, 4)]):
    f, l, p = make_batch(rng)
    loss = step(jnp.asarray(f, jnp.bfloat16), l, p, make_bank(rng, count), jax.random.key(i))
    assert loss.dtype == jnp.float32 and np.isfinite(float(loss))


# ------------------------------------------------------------------------------------------
# Devices: pmap with axis_name, shard_map with axis_name, jit over a mesh.


def _both_losses(a, al, av, k, kl, kv, self_index, axis_name=None):
  """Value and gradients of L_c (N = 2) and L_p."""
  out = {}
  for name, fn in (("topn", functools.partial(csc.topn_contrastive_loss, top_n=2)),
                   ("pixel", csc.pixel_contrastive_loss)):
    (v, _), g = jax.value_and_grad(lambda a, k, fn=fn: fn(
        a, al, av, k, kl, kv, temperature=TAU, anchor_key_index=self_index,
        axis_name=axis_name), argnums=(0, 1), has_aux=True)(a, k)
    out[name] = (v, g)
  return out


def test_topn_and_pixel_losses_under_pmap_equal_the_global_sets():
  rng = np.random.default_rng(11)
  anchors, alab, avalid, keys, klab, kvalid = random_sets(rng, a=16, m=24)
  # Device d holds queries 2d, 2d + 1 and keys 3d .. 3d + 2; some queries are their own key.
  self_idx = np.where(rng.random(16) < 0.5, np.arange(16) % 3, -1).astype(np.int32)
  global_self = np.where(self_idx >= 0, self_idx + (np.arange(16) // 2) * 3, -1)
  want = jax.jit(_both_losses)(anchors, alab, avalid, keys, klab, kvalid, global_self)
  split = lambda x: np.asarray(x).reshape((8, -1) + np.asarray(x).shape[1:])  # noqa: E731
  got = jax.pmap(lambda *args: _both_losses(*args, axis_name="d"), axis_name="d")(
      *(split(x) for x in (anchors, alab, avalid, keys, klab, kvalid, self_idx)))
  for name in ("topn", "pixel"):
    value, (ga, gk) = want[name]
    pv, (pa, pk) = got[name]
    np.testing.assert_allclose(pv, np.full(8, value), rtol=1e-6)
    # Each device receives exactly its rows' share of the global gradient.
    np.testing.assert_allclose(np.asarray(pa).reshape(ga.shape), ga, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(pk).reshape(gk.shape), gk, rtol=1e-5, atol=1e-7)
    assert float(value) > 0


def _composed(f, l, p, bank, key, axis_name=None):
  (v, aux), g = jax.value_and_grad(lambda f: csc.csc_contrastive_loss(
      f, l, p, bank, key, keep_fraction=0.7, axis_name=axis_name,
      **{**KW, "max_anchors": 40}), has_aux=True)(f)
  return v, g, aux["num_counted"]


def test_composed_loss_pmap_shard_map_and_mesh_match_the_global_batch(mesh8):
  rng = np.random.default_rng(12)
  feats, labels, preds = make_batch(rng)   # 8 images: one per device
  bank = make_bank(rng)
  keys = jax.random.split(jax.random.key(5), 8)
  value, grad, counted = jax.jit(_composed)(feats, labels, preds, bank, keys[0])
  assert float(value) > 0 and float(counted) > 0

  split = lambda x: x.reshape((8, 1) + x.shape[1:])  # noqa: E731
  pv, pg, pc = jax.pmap(lambda f, l, p, k: _composed(f, l, p, bank, k, "d"), axis_name="d")(
      split(feats), split(labels), split(preds), keys)
  np.testing.assert_allclose(pv, np.full(8, value), rtol=1e-6)
  np.testing.assert_array_equal(pc, np.full(8, counted))
  np.testing.assert_allclose(np.asarray(pg).reshape(grad.shape), grad, rtol=1e-5, atol=1e-7)

  def per_device(f, l, p, bank, k):
    v, g, _ = _composed(f, l, p, bank, k, "data")
    return v[None], g

  fn = jax.shard_map(per_device, mesh=mesh8,
                     in_specs=(P("data"), P("data"), P("data"), P(), P()),
                     out_specs=(P("data"), P("data")))
  shard = lambda x: jax.device_put(x, NamedSharding(mesh8, P("data")))  # noqa: E731
  sv, sg = jax.jit(fn)(shard(feats), shard(labels), shard(preds), bank, keys[0])
  np.testing.assert_allclose(sv, np.full(8, value), rtol=1e-6)
  np.testing.assert_allclose(sg, grad, rtol=1e-5, atol=1e-7)
  # Our trainer's path: jit over the mesh with sharded inputs and axis_name=None.
  mv, mg, _ = jax.jit(_composed)(shard(feats), shard(labels), shard(preds), bank, keys[0])
  np.testing.assert_allclose(mv, value, rtol=1e-6)
  np.testing.assert_allclose(mg, grad, rtol=1e-5, atol=1e-7)


def test_l2_normalize_values_and_finite_gradient_at_zero():
  from semijax import ops
  rng = np.random.default_rng(13)
  x = rng.normal(size=(5, D)).astype(np.float32)
  x[2] = 0.0
  np.testing.assert_allclose(csc.l2_normalize(x), ops.l2_normalize(x), rtol=1e-6)
  g = jax.grad(lambda x: jnp.sum(csc.l2_normalize(x) * jnp.arange(D)))(jnp.asarray(x))
  assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[2] == 0)
  want = jax.grad(lambda x: jnp.sum(ops.l2_normalize(x) * jnp.arange(D)))(jnp.asarray(x[:2]))
  np.testing.assert_allclose(np.asarray(g)[:2], want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("top_n", [1, None])
def test_chunked_similarities_give_the_same_values_and_gradients(top_n):
  rng = np.random.default_rng(14)
  anchors, alab, avalid, keys, klab, kvalid = random_sets(rng, a=11, m=17)
  self_idx = np.where(rng.random(11) < 0.5, np.arange(11), -1).astype(np.int32)

  def f(a, k, chunk):
    return csc.topn_contrastive_loss(a, alab, avalid, k, klab, kvalid, top_n=top_n,
                                     temperature=TAU, anchor_key_index=self_idx,
                                     chunk_size=chunk)[0]

  whole = jax.jit(jax.value_and_grad(lambda a, k: f(a, k, None), argnums=(0, 1)))(
      anchors, keys)
  chunked = jax.jit(jax.value_and_grad(lambda a, k: f(a, k, 4), argnums=(0, 1)))(
      anchors, keys)
  np.testing.assert_allclose(chunked[0], whole[0], rtol=1e-6)
  for g, w in zip(chunked[1], whole[1]):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


def test_blocks_without_a_valid_query_are_skipped_with_the_same_result():
  rng = np.random.default_rng(15)
  anchors, alab, _, keys, klab, kvalid = random_sets(rng, a=12, m=17)
  avalid = np.zeros(12, bool)
  avalid[:5] = True       # valid first: the second and third blocks of 4 hold none / one
  avalid[8] = True

  def f(a, k, chunk):
    return csc.topn_contrastive_loss(a, alab, avalid, k, klab, kvalid, top_n=1,
                                     temperature=TAU, chunk_size=chunk)[0]

  whole = jax.value_and_grad(lambda a, k: f(a, k, None), argnums=(0, 1))(anchors, keys)
  blocks = jax.jit(jax.value_and_grad(lambda a, k: f(a, k, 4), argnums=(0, 1)))(anchors, keys)
  np.testing.assert_allclose(blocks[0], whole[0], rtol=1e-6)
  for g, w in zip(blocks[1], whole[1]):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
