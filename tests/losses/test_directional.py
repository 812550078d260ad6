"""CAC's directional contrastive loss (eqs. 1-8): NumPy reference, direction of the gradient,
negative sampling, chunking, empty selections, retracing, memory, devices."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from semijax.losses import directional

pytestmark = pytest.mark.usefixtures("fast_compiles")

B, PAIRS, D, M, K, C = 8, 6, 5, 24, 10, 4   # 8 images x 6 pairs; 24 batch + 10 memory negatives
TAU, GAMMA = 0.1, 0.75


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def np_directional(f1, f2, c1, c2, y1, y2, pv, negs, ny, nv, *, tau=TAU, gamma=GAMMA,
                   directional_=True, negative_sampling=True, reduction="selected",
                   pairs_per_image=PAIRS):
  """Eqs. 1-8 with explicit loops over pairs and negatives (float64)."""
  f1, f2, negs = _unit(f1), _unit(f2), _unit(negs)
  total = 0.0
  for a, t, ca, ct, ya in ((f1, f2, c1, c2, y1), (f2, f1, c2, c1, y2)):
    losses, selected = [], []
    for i in range(len(a)):
      sel = bool(pv[i]) and ct[i] > gamma and (ca[i] < ct[i] if directional_ else True)
      pos = np.exp(a[i] @ t[i] / tau)
      den = pos
      for n in range(len(negs)):
        if nv[n] and (ny[n] != ya[i] or not negative_sampling):
          den += np.exp(a[i] @ negs[n] / tau)
      losses.append(-np.log(pos / den))
      selected.append(sel)
    losses, selected = np.array(losses), np.array(selected)
    if reduction == "selected":
      total += np.sum(losses * selected) / max(selected.sum(), 1)
    else:
      per_image = []
      for b in range(len(a) // pairs_per_image):
        rows = slice(b * pairs_per_image, (b + 1) * pairs_per_image)
        n_b = max(np.sum(pv[rows]), 1)
        per_image.append(np.sum(losses[rows] * selected[rows]) / n_b)
      total += np.mean(per_image)
  return total


def make_inputs(seed=0, *, n=B * PAIRS, m=M, k=K):
  rng = np.random.default_rng(seed)
  f1 = rng.normal(size=(n, D)).astype(np.float32)
  f2 = (f1 + 0.5 * rng.normal(size=(n, D))).astype(np.float32)
  c1 = rng.uniform(0.3, 1.0, n).astype(np.float32)
  c2 = rng.uniform(0.3, 1.0, n).astype(np.float32)
  y1 = rng.integers(0, C, n).astype(np.int32)
  y2 = np.where(rng.random(n) < 0.8, y1, rng.integers(0, C, n)).astype(np.int32)
  pv = rng.random(n) < 0.8
  negs = rng.normal(size=(m, D)).astype(np.float32)
  ny = rng.integers(0, C, m).astype(np.int32)
  nv = rng.random(m) < 0.85
  mem = (rng.normal(size=(k, D)).astype(np.float32), rng.integers(0, C, k).astype(np.int32),
         rng.random(k) < 0.7)
  return (f1, f2, c1, c2, y1, y2, pv, negs, ny, nv), mem


def _loss(f1, f2, *rest, memory=None, **kw):
  return directional.directional_contrastive_loss(f1, f2, *rest, memory=memory, **kw)


# kw travels as a hashable tuple of pairs (a static argument).
_vg = jax.jit(jax.value_and_grad(
    lambda f1, f2, rest, memory, kw: _loss(f1, f2, *rest, memory=memory, **dict(kw))[0],
    argnums=(0, 1)), static_argnames=("kw",))


def value_and_grads(args, memory=None, **kw):
  f1, f2, *rest = args
  return _vg(f1, f2, tuple(rest), memory, tuple(sorted(kw.items())))


@pytest.mark.parametrize("reduction", ["selected", "per_image"])
def test_matches_numpy_reference_with_memory(reduction):
  args, mem = make_inputs(0)
  value, _ = value_and_grads(args, mem, reduction=reduction, pairs_per_image=PAIRS)
  f1, f2, c1, c2, y1, y2, pv, negs, ny, nv = args
  want = np_directional(f1, f2, c1, c2, y1, y2, pv, np.concatenate([negs, mem[0]]),
                        np.concatenate([ny, mem[1]]), np.concatenate([nv, mem[2]]),
                        reduction=reduction)
  np.testing.assert_allclose(float(value), want, rtol=1e-5)
  assert float(value) > 0


@pytest.mark.parametrize("directional_,negative_sampling", [(False, True), (True, False)])
def test_ablation_switches_match_numpy(directional_, negative_sampling):
  args, _ = make_inputs(1)
  value, _ = value_and_grads(args, directional=directional_,
                             negative_sampling=negative_sampling)
  want = np_directional(*args, directional_=directional_, negative_sampling=negative_sampling)
  np.testing.assert_allclose(float(value), want, rtol=1e-5)


def test_aux_counts_and_selection():
  args, mem = make_inputs(2)
  _, aux = jax.jit(lambda a, m: _loss(*a, memory=m))(args, mem)
  f1, f2, c1, c2, y1, y2, pv, *_ = args
  m1 = pv & (c2 > GAMMA) & (c1 < c2)
  m2 = pv & (c1 > GAMMA) & (c2 < c1)
  np.testing.assert_array_equal(aux["selection"]["anchor_mask_1"], m1)
  np.testing.assert_array_equal(aux["selection"]["anchor_mask_2"], m2)
  assert float(aux["num_selected_1"]) == m1.sum() and float(aux["num_selected_2"]) == m2.sum()
  assert float(aux["num_negatives"]) == args[9].sum() + mem[2].sum()
  assert aux["selection"]["negative_valid"].shape == (M + K,)


def test_gradient_reaches_only_the_less_confident_side():
  args, mem = make_inputs(3)
  _, (g1, g2) = value_and_grads(args, mem)
  f1, f2, c1, c2, y1, y2, pv, *_ = args
  m1 = pv & (c2 > GAMMA) & (c1 < c2)   # view 2 teaches view 1
  m2 = pv & (c1 > GAMMA) & (c2 < c1)
  assert m1.any() and m2.any() and (~m1 & ~m2).any()
  moved1 = np.abs(np.asarray(g1)).sum(1) > 0
  moved2 = np.abs(np.asarray(g2)).sum(1) > 0
  np.testing.assert_array_equal(moved1, m1)   # only the anchors of direction 1 move in view 1
  np.testing.assert_array_equal(moved2, m2)   # the confident targets never do
  # Without the directional mask (vanilla CL) the target of a taught pair moves too.
  _, (v1, v2) = value_and_grads(args, mem, directional=False)
  taught = pv & (c2 > GAMMA)
  assert np.all(np.abs(np.asarray(v2))[taught].sum(1) > 0)


def test_negatives_sharing_the_anchor_pseudo_label_are_excluded():
  args, mem = make_inputs(4)
  f1, f2, c1, c2, y1, y2, pv, negs, ny, nv = args
  y1 = np.zeros_like(y1)
  y2 = np.zeros_like(y2)
  args = (f1, f2, c1, c2, y1, y2, pv, negs, ny, nv)
  base_value, _ = value_and_grads(args)
  # Moving the class-0 negatives changes nothing: no anchor may use them.
  moved = np.where((ny == 0)[:, None], np.random.default_rng(0).normal(size=negs.shape),
                   negs).astype(np.float32)
  value, _ = value_and_grads(args[:7] + (moved, ny, nv))
  np.testing.assert_allclose(float(value), float(base_value), rtol=1e-6)
  # ... unless negative sampling is off.
  off_base, _ = value_and_grads(args, negative_sampling=False)
  off_moved, _ = value_and_grads(args[:7] + (moved, ny, nv), negative_sampling=False)
  assert abs(float(off_base) - float(off_moved)) > 1e-3


@pytest.mark.parametrize("chunk_size", [1, 7, 16])
def test_chunked_equals_unchunked(chunk_size):
  args, mem = make_inputs(5)
  want, (w1, w2) = value_and_grads(args, mem, chunk_size=M + K)
  got, (g1, g2) = value_and_grads(args, mem, chunk_size=chunk_size)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
  np.testing.assert_allclose(g1, w1, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(g2, w2, rtol=1e-5, atol=1e-7)


def test_empty_selection_is_zero_with_finite_zero_grads():
  args, mem = make_inputs(6)
  low = np.full(args[2].shape, 0.5, np.float32)           # nobody above gamma
  for a in [args[:2] + (low, low) + args[4:],             # no confident target
            args[:6] + (np.zeros_like(args[6]),) + args[7:]]:   # no valid pair
    value, (g1, g2) = value_and_grads(a, mem)
    assert float(value) == 0.0
    assert np.all(np.asarray(g1) == 0.0) and np.all(np.asarray(g2) == 0.0)
  # No negatives at all: only the positive in the denominator, l = 0 exactly.
  f1, f2, c1, c2, y1, y2, pv, negs, ny, nv = args
  value, (g1, _) = value_and_grads((f1, f2, c1, c2, y1, y2, pv, negs[:0], ny[:0], nv[:0]))
  assert float(value) == 0.0 and np.all(np.isfinite(np.asarray(g1)))


def test_numerical_gradient():
  # The directional loss stops the gradient into its targets on purpose, so its gradient is
  # not the derivative of its value; the vanilla form (no stop-gradient) is, and shares every
  # other line of the computation.
  args, mem = make_inputs(7, n=12, m=8, k=3)
  f1, f2, *rest = args
  f = jax.jit(lambda a, b: _loss(a, b, *rest, memory=mem, directional=False)[0])
  jax.test_util.check_grads(f, (jnp.asarray(f1), jnp.asarray(f2)), order=1, modes=["rev"])
  # With the direction: the gradient into view 1 is that of L_1 with view 2 held constant.
  g1 = jax.grad(lambda a: _loss(a, f2, *rest, memory=mem)[0])(jnp.asarray(f1))
  only_l1 = jax.grad(lambda a: _loss(a, f2, *rest, memory=mem)[1]["loss_1"])(jnp.asarray(f1))
  np.testing.assert_allclose(g1, only_l1, rtol=1e-6, atol=1e-8)
  assert np.abs(np.asarray(g1)).sum() > 0


def test_bf16_inputs_give_f32_and_no_retrace():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def fn(args, mem):
    return _loss(*args, memory=mem)

  for seed in range(3):
    args, mem = make_inputs(10 + seed)
    args = (jnp.asarray(args[0], jnp.bfloat16), jnp.asarray(args[1], jnp.bfloat16)) + args[2:]
    loss, aux = fn(args, mem)
    assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
    assert aux["pos_sim_mean"].dtype == jnp.float32


def test_memory_grows_far_slower_than_the_number_of_negatives():
  """The compiled loss+gradient's temporary memory with chunks vs the whole [N, M] at once."""
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", False)
  try:
    n, d = 512, 32
    temp = {}
    for m, chunk in ((4096, 512), (16384, 512), (16384, 16384)):
      args = (jax.ShapeDtypeStruct((n, d), jnp.float32),) * 2 + (
          jax.ShapeDtypeStruct((n,), jnp.float32),) * 2 + (
          jax.ShapeDtypeStruct((n,), jnp.int32),) * 2 + (
          jax.ShapeDtypeStruct((n,), bool), jax.ShapeDtypeStruct((m, d), jnp.float32),
          jax.ShapeDtypeStruct((m,), jnp.int32), jax.ShapeDtypeStruct((m,), bool))
      fn = jax.jit(jax.grad(lambda f1, f2, *r, chunk=chunk: _loss(f1, f2, *r,
                                                                  chunk_size=chunk)[0],
                            argnums=(0, 1)))
      temp[(m, chunk)] = fn.lower(*args).compile().memory_analysis().temp_size_in_bytes
    # 12,288 more negatives in chunks: the temporaries grow by O(M D) (sorted labels and
    # features for the diagnostics), far less than the [N, M] logits would (N x 12288 x 4 B) ...
    assert temp[(16384, 512)] - temp[(4096, 512)] < 0.1 * n * (16384 - 4096) * 4, temp
    # ... and stay far below the unchunked loss's.
    assert temp[(16384, 512)] < temp[(16384, 16384)] / 8, temp
  finally:
    jax.config.update("jax_disable_most_optimizations", old)


def test_bad_reduction_is_named():
  args, _ = make_inputs(8)
  with pytest.raises(ValueError, match="reduction='mean'"):
    _loss(*args, reduction="mean")
  with pytest.raises(ValueError, match="pairs_per_image"):
    _loss(*args, reduction="per_image", pairs_per_image=5)


# --------------------------------------------------------------------------------------------
# Devices: each device holds B / 8 images (their pairs and their negatives); the memory is
# replicated. Value = the global one on every device, gradient = the device's rows of it.


def _global(args, mem, **kw):
  value, (g1, g2) = value_and_grads(args, mem, **kw)
  return float(value), np.asarray(g1), np.asarray(g2)


def _per_device(args, mem, axis_name, **kw):
  f1, f2, *rest = args
  value, grads = jax.value_and_grad(
      lambda a, b: directional.directional_contrastive_loss(
          a, b, *rest, memory=mem, axis_name=axis_name, **kw)[0], argnums=(0, 1))(f1, f2)
  return value, grads


@pytest.mark.parametrize("reduction", ["selected", "per_image"])
def test_pmap_matches_the_global_batch(reduction):
  args, mem = make_inputs(20)
  kw = dict(reduction=reduction, pairs_per_image=PAIRS, chunk_size=5)
  value, g1, g2 = _global(args, mem, **kw)
  split = lambda x: np.asarray(x).reshape((8, -1) + np.asarray(x).shape[1:])  # noqa: E731
  pv, (p1, p2) = jax.pmap(lambda *a: _per_device(a, mem, "d", **kw), axis_name="d")(
      *[split(x) for x in args])
  np.testing.assert_allclose(pv, np.full(8, value), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(p1).reshape(g1.shape), g1, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(p2).reshape(g2.shape), g2, rtol=1e-5, atol=1e-7)


def test_shard_map_and_mesh_jit_match_the_global_batch(mesh8):
  args, mem = make_inputs(21)
  value, g1, g2 = _global(args, mem, chunk_size=5)

  def per_device(*a):
    v, (d1, d2) = _per_device(a, mem, "data", chunk_size=5)
    return v[None], d1, d2

  fn = jax.shard_map(per_device, mesh=mesh8, in_specs=(P("data"),) * len(args),
                     out_specs=(P("data"),) * 3)
  shard = lambda x: jax.device_put(x, NamedSharding(mesh8, P("data")))  # noqa: E731
  sv, s1, s2 = jax.jit(fn)(*[shard(x) for x in args])
  np.testing.assert_allclose(sv, np.full(8, value), rtol=1e-6)
  np.testing.assert_allclose(s1, g1, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(s2, g2, rtol=1e-5, atol=1e-7)
  # Our trainer's path: jit over the mesh, sharded inputs, axis_name=None.
  mv, (m1, m2) = value_and_grads(tuple(shard(x) for x in args), mem, chunk_size=5)
  np.testing.assert_allclose(float(mv), value, rtol=1e-6)
  np.testing.assert_allclose(m1, g1, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(m2, g2, rtol=1e-5, atol=1e-7)
