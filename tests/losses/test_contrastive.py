"""DGCL contrastive loss (eqs. 12-13): NumPy references, empty cases, retracing, devices."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from semijax.banks import fifo
from semijax.losses import contrastive
from semijax.sampling import dgcl
from tests.references import np_density

C, K, D, DV = 4, 16, 6, 5
# 8 x 4 x 4 = 128 pixels: every class has fewer than 100 and there are fewer than 128
# negatives, so the selection is deterministic and the NumPy reference needs no key.
KW = dict(num_anchors=5, num_batch_keys=3, num_bank_keys=4, num_negatives=128,
          max_per_class=100, ks=(2, 4, 8), chunk_size=16)


pytestmark = pytest.mark.usefixtures("fast_compiles")


def _unit(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def np_dgcl_loss(anchors, av, centre, cv, negs, nv, *, tau, form, eps=1e-6):
  """Eq. 13 with boolean indexing; mean over anchors per class, then over classes."""
  per_class = []
  for c in range(anchors.shape[0]):
    if not av[c].any() or not cv[c] or (form == "paper" and not nv[c].any()):
      continue
    a = _unit(anchors[c][av[c]].astype(np.float64))
    lp = a @ _unit(centre[c].astype(np.float64)) / tau
    ln = a @ _unit(negs[c][nv[c]].astype(np.float64)).T / tau
    m = np.max(np.concatenate([lp[:, None], ln], 1), 1)
    den = np.exp(ln - m[:, None]).sum(1)
    if form == "supcon":
      den = den + np.exp(lp - m)
    per_class.append(np.mean(-(lp - m - np.log(den + eps))))
  return float(np.mean(per_class)) if per_class else 0.0


def np_centre(keys, valid):
  return np.stack([_unit(keys[c][valid[c]].mean(0)) if valid[c].any()
                   else np.zeros(keys.shape[-1]) for c in range(keys.shape[0])])


def random_selection(rng, a=6, nn=7):
  anchors = rng.normal(size=(C, a, D)).astype(np.float32)
  centre = rng.normal(size=(C, D)).astype(np.float32)
  negs = rng.normal(size=(C, nn, D)).astype(np.float32)
  av = rng.random((C, a)) < 0.6
  nv = rng.random((C, nn)) < 0.6
  av[0] = False  # a class without anchors
  av[1, 0] = True
  nv[1] = False  # a class without negatives: kept by supcon, dropped by paper
  av[2, 0] = True
  return anchors, av, centre, negs, nv


@pytest.mark.parametrize("form", ["supcon", "paper"])
@pytest.mark.parametrize("eps", [1e-6, 0.0])
def test_dgcl_loss_matches_numpy(form, eps):
  rng = np.random.default_rng(0)
  anchors, av, centre, negs, nv = random_selection(rng)
  cv = np.array([True, True, True, False])
  loss, aux = jax.jit(functools.partial(contrastive.dgcl_loss, temperature=0.5, form=form,
                                        eps=eps))(anchors, centre, negs, av, nv, cv)
  want = np_dgcl_loss(anchors, av, centre, cv, negs, nv, tau=0.5, form=form, eps=eps)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  assert float(aux["num_classes"]) == (2.0 if form == "supcon" else 1.0)


def test_key_centre_matches_numpy():
  rng = np.random.default_rng(1)
  keys = rng.normal(size=(C, 5, D)).astype(np.float32) * 3
  valid = rng.random((C, 5)) < 0.5
  valid[0] = False
  centre, cv = contrastive.key_centre(keys, valid)
  np.testing.assert_allclose(centre, np_centre(keys, valid), rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(cv, valid.any(1))
  # Variant: normalise the keys first.
  centre_n, _ = contrastive.key_centre(keys, valid, normalize_keys=True)
  np.testing.assert_allclose(centre_n, np_centre(_unit(keys), valid), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("form", ["supcon", "paper"])
def test_empty_selection_is_zero_with_finite_grads(form):
  rng = np.random.default_rng(2)
  anchors, _, centre, negs, nv = random_selection(rng)
  none = np.zeros(anchors.shape[:2], bool)

  @jax.jit
  @jax.value_and_grad
  def f(a, av, nv):
    return contrastive.dgcl_loss(a, centre, negs, av, nv, form=form)[0]

  loss, g = f(anchors, none, nv)
  assert float(loss) == 0.0
  np.testing.assert_array_equal(g, 0.0)
  # Anchors but no negatives anywhere: 'paper' has nothing to contrast, 'supcon' gives
  # -log(1 / (1 + eps)) ~ 1e-6 (the positive alone).
  loss, g = f(anchors, np.ones(anchors.shape[:2], bool), np.zeros_like(nv))
  assert np.all(np.isfinite(g))
  if form == "paper":
    assert float(loss) == 0.0
  else:
    np.testing.assert_allclose(loss, np.log1p(1e-6), atol=1e-7)  # f32: 1 + 1e-6 rounds


# --------------------------------------------------------------------------------------
# The composed loss.


def make_bank(rng, fill):
  bank = dgcl.init_bank(C, K, feature_dim=DV, projection_dim=D)
  entries = {
      dgcl.FEATURE: rng.normal(size=(C, K, DV)).astype(np.float32),
      dgcl.PROJECTION: rng.normal(size=(C, K, D)).astype(np.float32),
      dgcl.DENSITY: rng.uniform(-1, 1, size=(C, K)).astype(np.float32),
  }
  return fifo.write(bank, entries, np.arange(K)[None, :] < np.asarray(fill)[:, None])


def make_batch(rng, b=8, h=4, w=4):
  proj = rng.normal(size=(b, h, w, D)).astype(np.float32)
  feats = rng.normal(size=(b, h, w, DV)).astype(np.float32)
  labels = rng.integers(0, C, (b, h, w))
  labels[rng.random((b, h, w)) < 0.2] = 255
  labels[labels == 3] = 2  # class 3 absent
  return proj, feats, labels.astype(np.int32)


# One compile per static configuration, shared by the tests (CPU compiles dominate).
_vg = jax.jit(jax.value_and_grad(contrastive.dgcl_contrastive_loss, has_aux=True),
              static_argnames=tuple(KW) + ("wait_for_full_bank",))


def np_composed_loss(proj, feats, labels, bank, *, ks, num_anchors, num_batch_keys,
                     num_bank_keys, exclude=(0,), tau=0.5):
  """Eqs. 7-13 with boolean indexing, for a full bank, all candidates and all negatives."""
  proj, feats, labels = proj.reshape(-1, D), feats.reshape(-1, DV), labels.reshape(-1)
  bank_f, bank_p, bank_d = (np.asarray(bank.entries[n]) for n in
                            (dgcl.FEATURE, dgcl.PROJECTION, dgcl.DENSITY))
  per_class, anchor_rows = [], []
  for c in range(C):
    rows = np.nonzero(labels == c)[0]
    if c in exclude or len(rows) == 0:
      continue
    d = np_density(feats[rows], bank_f[c], None, ks) if len(rows) > max(ks) else np.ones(len(rows))
    order = np.argsort(d, kind="stable")
    anchors = rows[order[:num_anchors]]  # eq. 9
    keys_b = proj[rows[order[::-1][:num_batch_keys]]]  # eq. 10
    keys_m = bank_p[c][np.argsort(-bank_d[c])[:num_bank_keys]]  # eq. 11
    centre = np.concatenate([keys_b, keys_m]).mean(0)  # eq. 12 (official: raw keys)
    negs = proj[(labels != c) & (labels != 255)]
    per_class.append(np_dgcl_loss(proj[anchors][None], np.ones((1, len(anchors)), bool),
                                  centre[None], [True], negs[None],
                                  np.ones((1, len(negs)), bool), tau=tau, form="supcon"))
    anchor_rows.extend(anchors)
  return float(np.mean(per_class)), np.array(anchor_rows)


def test_composed_loss_matches_numpy_and_grads_reach_anchors_only():
  rng = np.random.default_rng(3)
  bank = make_bank(rng, [K] * C)
  proj, feats, labels = make_batch(rng)
  labels[0, 0, :2] = 3  # class 3 with 2 pixels: the official density := 1 rule
  (loss, aux), g = _vg(proj, feats, labels, bank, jax.random.key(0), **KW)
  want, anchor_rows = np_composed_loss(proj, feats, labels, bank, ks=KW["ks"],
                                       num_anchors=5, num_batch_keys=3, num_bank_keys=4)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  assert float(aux["num_classes"]) == 3.0 and float(aux["bank_full"]) == 1.0
  touched = np.zeros(proj.size // D, bool)
  touched[anchor_rows] = True
  g = np.asarray(g).reshape(-1, D)
  assert np.all(g[~touched] == 0.0) and np.all(np.abs(g[touched]).sum(1) > 0)


def test_selection_in_aux_is_what_was_contrasted():
  rng = np.random.default_rng(3)
  bank = make_bank(rng, [K] * C)
  proj, feats, labels = make_batch(rng)
  (loss, aux), _ = _vg(proj, feats, labels, bank, jax.random.key(0), **KW)
  sel = aux["selection"]
  assert isinstance(sel, dgcl.DGCLSelection)
  # The same selection as the sampler with the loss's key, and the anchors of the NumPy loss.
  want, _ = dgcl.sample(feats, labels, bank, jax.random.key(0), num_anchors=5,
                        num_batch_keys=3, num_bank_keys=4, num_negatives=128,
                        max_per_class=100, ks=(2, 4, 8), chunk_size=16)
  for got, ref in zip(sel, want):
    np.testing.assert_array_equal(got, ref)
  _, anchor_rows = np_composed_loss(proj, feats, labels, bank, ks=KW["ks"], num_anchors=5,
                                    num_batch_keys=3, num_bank_keys=4)
  drawn = np.asarray(sel.anchor_idx)[np.asarray(sel.anchor_valid)]
  assert sorted(drawn) == sorted(anchor_rows)
  flat = labels.reshape(-1)
  for c in range(C):
    assert (flat[np.asarray(sel.anchor_idx[c])[np.asarray(sel.anchor_valid[c])]] == c).all()
    negatives = flat[np.asarray(sel.negative_idx[c])[np.asarray(sel.negative_valid[c])]]
    assert ((negatives != c) & (negatives != 255)).all()
  # Every other entry is a scalar; the skip branch (bank not full) selects nothing.
  assert all(np.ndim(v) == 0 for k, v in aux.items() if k != "selection")
  (loss, aux), _ = _vg(proj, feats, labels, make_bank(rng, [K, K, 7, K]),
                       jax.random.key(0), **KW)
  assert float(loss) == 0.0
  assert jax.tree.structure(aux["selection"]) == jax.tree.structure(sel)
  for got, ref in zip(aux["selection"], sel):
    assert got.shape == ref.shape and got.dtype == ref.dtype and not np.asarray(got).any()


def test_dgcl_loss_numerical_gradient():
  rng = np.random.default_rng(4)
  anchors, av, centre, negs, nv = random_selection(rng)
  for form in ("supcon", "paper"):
    f = jax.jit(functools.partial(
        lambda a, form: contrastive.dgcl_loss(a, centre, negs, av, nv, form=form)[0],
        form=form))
    jax.test_util.check_grads(f, (jnp.asarray(anchors),), order=1, modes=["rev"])


def test_wait_for_full_bank_and_empty_bank():
  rng = np.random.default_rng(5)
  proj, feats, labels = make_batch(rng)
  key = jax.random.key(2)
  partial = make_bank(rng, [K, K, 7, K])
  (loss, aux), g = _vg(proj, feats, labels, partial, key, **KW)  # waits by default
  assert float(loss) == 0.0 and float(aux["bank_full"]) == 0.0
  np.testing.assert_array_equal(g, 0.0)
  (loss, _), g = _vg(proj, feats, labels, partial, key, wait_for_full_bank=False, **KW)
  assert float(loss) > 0 and np.all(np.isfinite(g))
  empty = dgcl.init_bank(C, K, feature_dim=DV, projection_dim=D)
  # Density 0 everywhere, centre from the batch keys only.
  (loss, aux), g = _vg(proj, feats, labels, empty, key, wait_for_full_bank=False, **KW)
  assert np.isfinite(float(loss)) and float(loss) > 0 and np.all(np.isfinite(g))
  assert float(aux["candidate_density_mean"]) == 0.0
  # Nothing labelled: exactly 0 with zero (finite) gradients.
  (loss, _), g = _vg(proj, feats, np.full_like(labels, 255), make_bank(rng, [K] * C), key,
                     **KW)
  assert float(loss) == 0.0 and np.all(g == 0.0)


def test_bf16_inputs_give_f32_and_no_retrace_across_steps():
  rng = np.random.default_rng(6)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(bank, proj, feats, labels, key):
    return contrastive.dgcl_contrastive_loss(proj, feats, labels, bank, key, **KW)

  losses = []
  for i, fill in enumerate([[K, 10, 10, K], [K] * C, [K] * C]):  # bank fills up
    proj, feats, labels = make_batch(rng)
    loss, _ = step(make_bank(rng, fill), jnp.asarray(proj, jnp.bfloat16), feats, labels,
                   jax.random.key(i))
    assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
    losses.append(float(loss))
  assert losses[0] == 0.0 and losses[1] > 0 and losses[2] > 0


# --------------------------------------------------------------------------------------
# Devices: pmap with axis_name, shard_map with axis_name, jit over a mesh.


def _global_value_and_grad(proj, feats, labels, bank, key):
  (value, _), grad = _vg(proj, feats, labels, bank, key, **KW)
  return value, grad


def test_pmap_matches_single_device_global_batch():
  rng = np.random.default_rng(7)
  bank = make_bank(rng, [K] * C)
  proj, feats, labels = make_batch(rng)  # 8 images: one per device
  keys = jax.random.split(jax.random.key(3), 8)
  value, grad = _global_value_and_grad(proj, feats, labels, bank, keys[0])

  def per_device(p, f, l, k):
    return jax.value_and_grad(lambda p: contrastive.dgcl_contrastive_loss(
        p, f, l, bank, k, axis_name="d", **KW)[0])(p)

  split = lambda x: x.reshape((8, 1) + x.shape[1:])  # noqa: E731
  pv, pg = jax.pmap(per_device, axis_name="d")(split(proj), split(feats), split(labels),
                                               keys)
  np.testing.assert_allclose(pv, np.full(8, value), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(pg).reshape(proj.shape), grad, rtol=1e-5, atol=1e-7)
  assert float(value) > 0


def test_shard_map_and_mesh_jit_match_single_device(mesh8):
  rng = np.random.default_rng(8)
  bank = make_bank(rng, [K] * C)
  proj, feats, labels = make_batch(rng)
  key = jax.random.key(4)
  value, grad = _global_value_and_grad(proj, feats, labels, bank, key)

  def per_device(p, f, l, bank, k):
    v, g = jax.value_and_grad(lambda p: contrastive.dgcl_contrastive_loss(
        p, f, l, bank, k, axis_name="data", **KW)[0])(p)
    return v[None], g

  fn = jax.shard_map(per_device, mesh=mesh8,
                     in_specs=(P("data"), P("data"), P("data"), P(), P()),
                     out_specs=(P("data"), P("data")))
  shard = lambda x: jax.device_put(x, NamedSharding(mesh8, P("data")))  # noqa: E731
  sv, sg = jax.jit(fn)(shard(proj), shard(feats), shard(labels), bank, key)
  np.testing.assert_allclose(sv, np.full(8, value), rtol=1e-6)
  np.testing.assert_allclose(sg, grad, rtol=1e-5, atol=1e-7)

  # Our trainer's path: jit over the mesh with sharded inputs and axis_name=None.
  mv, mg = jax.jit(lambda p, f, l, b, k: jax.value_and_grad(
      lambda p: contrastive.dgcl_contrastive_loss(p, f, l, b, k, **KW)[0])(p))(
          shard(proj), shard(feats), shard(labels), bank, key)
  np.testing.assert_allclose(mv, value, rtol=1e-6)
  np.testing.assert_allclose(mg, grad, rtol=1e-5, atol=1e-7)
