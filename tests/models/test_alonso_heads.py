"""Alonso et al.'s class-wise attention modules and the DeepLabv2 segmenter."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semijax.models import alonso_heads, deeplabv2, heads, registry, resnet

C, D, H = 4, 6, 5

pytestmark = pytest.mark.usefixtures("fast_compiles")


def _module(**kw):
  return alonso_heads.ClassAttention(C, features=D, hidden=H, source="x", **kw)


def _init(module):
  x = jnp.zeros((2, 3, 3, D))
  return module.init(jax.random.key(0), x)


def _perturbed(variables, rng):
  """Random parameters (the BN affine ones too) and running statistics."""
  leaves, tree = jax.tree.flatten(variables)
  leaves = [np.asarray(x) + rng.normal(size=x.shape).astype(np.float32) * 0.3 for x in leaves]
  out = jax.tree.unflatten(tree, leaves)
  out["batch_stats"] = jax.tree.map(np.abs, out["batch_stats"])  # variances > 0
  return out


def np_scores(params, x, groups, valid, side, *, train, stats=None, eps=1e-5):
  """Per class c: Linear -> BN (batch statistics of the class's valid rows) -> LeakyReLU(0.2)
  -> Linear -> sigmoid, with boolean indexing."""
  p = {k[len(side) + 1:]: np.asarray(v, np.float64) for k, v in params.items()
       if k.startswith(side + "_")}
  out = np.zeros(len(x))
  for c in range(C):
    m = valid & (groups == c)
    if not m.any():
      continue
    h = x[m].astype(np.float64) @ p["kernel1"][c] + p["bias1"][c]
    if train:
      mean, var = h.mean(0), h.var(0)
    else:
      mean, var = stats[f"{side}_mean"][c], stats[f"{side}_var"][c]
    y = (h - mean) / np.sqrt(var + eps) * p["bn_scale"][c] + p["bn_bias"][c]
    y = np.where(y > 0, y, 0.2 * y)
    out[m] = 1 / (1 + np.exp(-(y @ p["kernel2"][c] + p["bias2"][c])))
  return out


@pytest.mark.parametrize("impl", ["tiles", "dense"])
@pytest.mark.parametrize("train", [True, False])
def test_scores_match_numpy(impl, train):
  rng = np.random.default_rng(0)
  module = _module(impl=impl, tile=8)
  variables = _perturbed(_init(module), rng)
  x = rng.normal(size=(37, D)).astype(np.float32)
  groups = rng.integers(0, C + 1, 37)  # C: no module
  valid = rng.random(37) < 0.85
  stats = jax.tree.map(np.asarray, variables["batch_stats"])
  for side in alonso_heads.SIDES:
    fn = functools.partial(module.apply, method="scores", side=side, train=train)
    if train:
      got, _ = fn(variables, x, groups, valid, mutable=["batch_stats"])
    else:
      got = fn(variables, x, groups, valid)
    want = np_scores(variables["params"], x, groups, valid, side, train=train, stats=stats)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(got)[~(valid & (groups < C))] == 0)


def test_class_scores_match_numpy_and_running_statistics():
  rng = np.random.default_rng(1)
  module = _module()
  variables = _perturbed(_init(module), rng)
  x = rng.normal(size=(C, 7, D)).astype(np.float32)
  valid = rng.random((C, 7)) < 0.7
  valid[2] = False  # an empty class
  got, new = module.apply(variables, x, valid, method="class_scores", side="projection",
                          train=True, mutable=["batch_stats"])
  groups = np.repeat(np.arange(C), 7)
  want = np_scores(variables["params"], x.reshape(-1, D), groups, valid.reshape(-1),
                   "projection", train=True)
  np.testing.assert_allclose(np.asarray(got).reshape(-1), want, rtol=1e-5, atol=1e-6)
  # Running statistics move for the classes present only (PyTorch: unbiased variance, 0.1).
  old = variables["batch_stats"]
  p = {k: np.asarray(v, np.float64) for k, v in variables["params"].items()}
  for c in range(C):
    m_new = np.asarray(new["batch_stats"]["projection_mean"])[c]
    v_new = np.asarray(new["batch_stats"]["projection_var"])[c]
    if not valid[c].any():
      np.testing.assert_array_equal(m_new, old["projection_mean"][c])
      continue
    h = x[c][valid[c]] @ p["projection_kernel1"][c] + p["projection_bias1"][c]
    np.testing.assert_allclose(m_new, 0.9 * old["projection_mean"][c] + 0.1 * h.mean(0),
                               rtol=1e-5)
    if valid[c].sum() > 1:
      np.testing.assert_allclose(v_new, 0.9 * old["projection_var"][c] + 0.1 * h.var(0, ddof=1),
                                 rtol=1e-5)
  # The prediction side is untouched by a projection-side call.
  np.testing.assert_array_equal(new["batch_stats"]["prediction_mean"],
                                old["prediction_mean"])


def test_weights_differ_from_one_and_gradients_reach_both_sides():
  rng = np.random.default_rng(2)
  module = _module()
  variables = _init(module)
  x = rng.normal(size=(30, D)).astype(np.float32)
  groups = rng.integers(0, C, 30)

  def loss(params):
    v = {"params": params, "batch_stats": variables["batch_stats"]}
    s, _ = module.apply(v, x, groups, method="scores", side="prediction", train=True,
                        mutable=["batch_stats"])
    z, _ = module.apply(v, x[:C * 5].reshape(C, 5, D), None, method="class_scores",
                        side="projection", train=True, mutable=["batch_stats"])
    return jnp.sum(s * jnp.arange(30)) + jnp.sum(z ** 2), s

  grads, s = jax.grad(loss, has_aux=True)(variables["params"])
  s = np.asarray(s)
  assert s.std() > 1e-3 and np.all((s > 0) & (s < 1))
  for name, g in grads.items():
    assert np.any(np.asarray(g) != 0), name


def test_sync_bn_under_pmap_equals_global_batch():
  rng = np.random.default_rng(3)
  module = _module(bn_axis_name="d")
  single = _module()
  variables = _perturbed(_init(single), rng)
  x = rng.normal(size=(8 * 6, D)).astype(np.float32)
  groups = rng.integers(0, C, 8 * 6)
  want, _ = single.apply(variables, x, groups, method="scores", train=True,
                         mutable=["batch_stats"])
  got = jax.pmap(lambda x, g: module.apply(variables, x, g, method="scores", train=True,
                                           mutable=["batch_stats"])[0], axis_name="d")(
      x.reshape(8, 6, D), groups.reshape(8, 6))
  np.testing.assert_allclose(np.asarray(got).reshape(-1), want, rtol=1e-5, atol=1e-6)


def test_as_a_head_and_through_model_apply():
  model = registry.build_model(
      "deeplabv3plus_small", C, widths=(8, 8, 16, 16), stem_width=8,
      heads={"proj": heads.PixelMLP(hidden=D, out=D), "att": _module().clone(source="proj")})
  variables = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)},
                         jnp.zeros((2, 32, 32, 3)))
  out = model.apply(variables, jnp.zeros((2, 32, 32, 3)))
  assert out["att"].shape == (2, 8, 8, 0)  # the head only owns parameters
  assert set(variables["params"]["heads_att"]) >= {"prediction_kernel1", "projection_kernel2"}
  fn = alonso_heads.attention_method("att", "class_scores", "projection")
  s = model.apply(variables, (jnp.ones((C, 3, D)), None), train=False, method=fn)
  assert s.shape == (C, 3)
  with pytest.raises(ValueError, match="kind"):
    alonso_heads.attention_method("att", "nope", "projection")


# DeepLabv2.


def _v2(rates=deeplabv2.DEFAULT_RATES, **kw):
  backbone = resnet.small_resnet(widths=(8, 8, 16, 16), stem_width=8, output_stride=8)
  return deeplabv2.DeepLabV2(C, backbone, aspp_rates=rates, **kw)


def test_deeplabv2_sums_all_four_branches():
  model = _v2(heads={"proj": heads.PixelMLP(hidden=D, out=D)})
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
  variables = model.init(jax.random.key(1), x)
  out = model.apply(variables, x)
  assert out["logits"].shape == (2, 4, 4, C)  # stride 8
  assert out["decoder"].shape == out["encoder"].shape == (2, 4, 4, 16)
  assert out["proj"].shape == (2, 4, 4, D) and "low_level" in out
  classifier = variables["params"]["classifier"]
  assert sorted(classifier) == [f"branch{i}" for i in range(4)]
  # The official head sums only the first two branches: a different function.
  feats = out["encoder"]
  branch = lambda i, r: jax.lax.conv_general_dilated(  # noqa: E731
      feats, classifier[f"branch{i}"]["kernel"], (1, 1), [(r, r), (r, r)],
      rhs_dilation=(r, r), dimension_numbers=("NHWC", "HWIO", "NHWC")) + classifier[
          f"branch{i}"]["bias"]
  total = sum(branch(i, r) for i, r in enumerate(deeplabv2.DEFAULT_RATES))
  np.testing.assert_allclose(out["logits"], total, rtol=1e-5, atol=1e-6)
  assert not np.allclose(out["logits"], branch(0, 6) + branch(1, 12), atol=1e-6)


def test_deeplabv2_resnet101_parameter_count():
  model = deeplabv2.DeepLabV2(21, resnet.resnet101(output_stride=8))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 65, 65, 3))))
  count = lambda t: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(t))  # noqa: E731
  assert count(shapes["params"]["backbone"]) == 42_500_160  # torchvision ResNet-101 minus fc
  assert count(shapes["params"]["classifier"]) == 4 * (3 * 3 * 2048 * 21 + 21)


@pytest.mark.skipif("deeplabv2_resnet101" not in registry.model_names(),
                    reason="needs the registry entry (BUILD_NOTES, Alonso: registry change)")
def test_registry_builds_deeplabv2():
  model = registry.build_model("deeplabv2_resnet101", 21)
  assert isinstance(model, deeplabv2.DeepLabV2) and model.backbone.output_stride == 8
