"""BatchNorm (PyTorch statistics, SyncBN, per-group BN), torch-style pooling and padding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semijax.models import layers

B, H, W, C = 16, 3, 5, 4


def _x(seed=0, shape=(B, H, W, C)):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(2.0, 3.0, shape), jnp.float32)


def _bn_numpy(x, momentum=0.9, eps=1e-5):
  """PyTorch BatchNorm2d train step from its definition (running stats start at 0 / 1)."""
  x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
  mean, var = x.mean(0), x.var(0)
  y = (x - mean) / np.sqrt(var + eps)
  unbiased = var * x.shape[0] / (x.shape[0] - 1)
  return y, (1 - momentum) * mean, momentum + (1 - momentum) * unbiased


def _train(module, variables, x):
  return module.apply(variables, x, use_running_average=False, mutable=['batch_stats'])


def test_batchnorm_matches_pytorch_definition():
  bn = layers.BatchNorm()
  x = _x()
  variables = bn.init(jax.random.key(0), x, use_running_average=False)
  assert jax.tree.map(jnp.shape, variables) == {
      'params': {'scale': (C,), 'bias': (C,)}, 'batch_stats': {'mean': (C,), 'var': (C,)}}
  y, state = _train(bn, variables, x)
  y_ref, mean_ref, var_ref = _bn_numpy(x)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, C), y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(state['batch_stats']['mean'], mean_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state['batch_stats']['var'], var_ref, rtol=1e-5)
  # Same normalised output as flax's BatchNorm (which keeps the biased running variance).
  y_flax, _ = nn.BatchNorm(momentum=0.9, epsilon=1e-5).apply(
      variables, x, use_running_average=False, mutable=['batch_stats'])
  np.testing.assert_allclose(y, y_flax, rtol=1e-4, atol=1e-4)
  # Eval mode uses the running statistics.
  y_eval = bn.apply(state | {'params': variables['params']}, x, use_running_average=True)
  expected = (x - state['batch_stats']['mean']) / jnp.sqrt(state['batch_stats']['var'] + 1e-5)
  np.testing.assert_allclose(y_eval, expected, rtol=1e-5, atol=1e-5)


def test_batchnorm_init_does_not_update_stats_and_dtype():
  bn = layers.BatchNorm(dtype=jnp.bfloat16)
  x = _x().astype(jnp.bfloat16)
  variables = bn.init(jax.random.key(0), x, use_running_average=False)
  np.testing.assert_array_equal(variables['batch_stats']['mean'], 0.0)
  np.testing.assert_array_equal(variables['batch_stats']['var'], 1.0)
  y, state = _train(bn, variables, x)
  assert y.dtype == jnp.bfloat16
  assert variables['params']['scale'].dtype == jnp.float32
  assert state['batch_stats']['mean'].dtype == jnp.float32


def test_syncbn_under_pmap_equals_one_device_on_the_global_batch():
  x = _x(1)
  bn = layers.BatchNorm(axis_name='d')
  variables = layers.BatchNorm().init(jax.random.key(0), x, use_running_average=False)
  variables['params'] = {'scale': jnp.linspace(0.5, 2.0, C), 'bias': jnp.linspace(-1, 1, C)}
  y_ref, state_ref = _train(layers.BatchNorm(), variables, x)

  y, state = jax.pmap(lambda v, a: _train(bn, v, a), axis_name='d', in_axes=(None, 0))(
      variables, x.reshape(8, B // 8, H, W, C))
  np.testing.assert_allclose(y.reshape(x.shape), y_ref, rtol=1e-5, atol=1e-5)
  for name in ('mean', 'var'):
    np.testing.assert_allclose(state['batch_stats'][name],
                               np.broadcast_to(state_ref['batch_stats'][name], (8, C)),
                               rtol=1e-5, atol=1e-6)


def test_syncbn_gradients_under_pmap_are_the_global_ones():
  x = _x(2)
  weights = jnp.asarray(np.random.default_rng(3).normal(size=x.shape), jnp.float32)
  variables = layers.BatchNorm().init(jax.random.key(0), x, use_running_average=False)

  def loss(bn, a, w):
    y, _ = _train(bn, variables, a)
    return jnp.sum(jnp.sin(y) * w)

  g_ref = jax.grad(lambda a: loss(layers.BatchNorm(), a, weights))(x)
  g = jax.pmap(jax.grad(lambda a, w: loss(layers.BatchNorm(axis_name='d'), a, w)),
               axis_name='d')(x.reshape(8, 2, H, W, C), weights.reshape(8, 2, H, W, C))
  np.testing.assert_allclose(g.reshape(x.shape), g_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('groups', [2, 4])
def test_batch_groups_under_jit_equal_per_device_bn_under_pmap(groups):
  x = _x(4)
  variables = layers.BatchNorm().init(jax.random.key(0), x, use_running_average=False)
  y, state = jax.jit(lambda a: _train(layers.BatchNorm(batch_groups=groups), variables, a))(x)
  # Unsynchronised BN: pmap without axis_name, each device on its consecutive rows.
  y_dev, state_dev = jax.pmap(lambda a: _train(layers.BatchNorm(), variables, a))(
      x.reshape(groups, B // groups, H, W, C))
  np.testing.assert_allclose(y, y_dev.reshape(x.shape), rtol=1e-5, atol=1e-5)
  for name in ('mean', 'var'):
    np.testing.assert_allclose(state['batch_stats'][name],
                               state_dev['batch_stats'][name].mean(0), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='divisible'):
    _train(layers.BatchNorm(batch_groups=3), variables, x)


def _max_pool_numpy(x, window, stride, pad, ceil_mode):
  """PyTorch's MaxPool2d output-size rule and -inf padding, by loops."""
  n, h, w, c = x.shape

  def size(length):
    span = length + 2 * pad - window
    out = (int(np.ceil(span / stride)) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= length + pad:
      out -= 1
    return out

  xp = np.full((n, h + 2 * pad + window, w + 2 * pad + window, c), -np.inf)
  xp[:, pad:pad + h, pad:pad + w] = x
  oh, ow = size(h), size(w)
  out = np.empty((n, oh, ow, c))
  for i in range(oh):
    for j in range(ow):
      rows, cols = slice(i * stride, i * stride + window), slice(j * stride, j * stride + window)
      out[:, i, j] = xp[:, rows, cols].max((1, 2))
  return out


@pytest.mark.parametrize('size', [(8, 9), (7, 10), (5, 5)])
@pytest.mark.parametrize('ceil_mode', [False, True])
def test_max_pool_matches_pytorch_rule(size, ceil_mode):
  x = np.asarray(_x(5, (2,) + size + (3,)))
  got = layers.max_pool(jnp.asarray(x), 3, 2, 1, ceil_mode=ceil_mode)
  np.testing.assert_array_equal(got, _max_pool_numpy(x, 3, 2, 1, ceil_mode))


def test_conv_padding_is_symmetric_like_pytorch():
  # A stride-2 3x3 conv on an even input: PyTorch pads 1 on each side; 'SAME' would not.
  x = jnp.arange(2 * 6 * 6 * 1, dtype=jnp.float32).reshape(2, 6, 6, 1)
  module = layers.conv(1, 3, strides=2, dilation=1)
  variables = {'params': {'kernel': jnp.zeros((3, 3, 1, 1)).at[0, 0].set(1.0)}}
  y = module.apply(variables, x)
  # Top-left tap of output (i, j) reads input (2i - 1, 2j - 1), zero outside.
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  np.testing.assert_array_equal(y, xp[:, 0:6:2, 0:6:2])
  dilated = layers.conv(1, 3, dilation=4).apply(
      {'params': {'kernel': jnp.ones((3, 3, 1, 1))}}, x)
  assert dilated.shape == x.shape


def test_channel_dropout_drops_whole_channels():
  x = jnp.ones((4, 5, 6, 32))
  y = layers.channel_dropout(0.5).apply({}, x, deterministic=False,
                                        rngs={'dropout': jax.random.key(0)})
  per_channel = np.asarray(y).reshape(4, 30, 32)
  assert np.all(per_channel == per_channel[:, :1])  # constant over H, W
  assert set(np.unique(per_channel)) == {0.0, 2.0}
  np.testing.assert_array_equal(layers.channel_dropout(0.5).apply({}, x, deterministic=True), x)
  elementwise = layers.channel_dropout(0.5, channelwise=False).apply(
      {}, x, deterministic=False, rngs={'dropout': jax.random.key(0)})
  assert not np.all(np.asarray(elementwise).reshape(4, 30, 32) == per_channel[:, :1])


@pytest.mark.parametrize('size,kernel,stride,dilation', [
    (4, 3, 1, 12), (4, 3, 1, 36), (5, 3, 1, 3), (9, 3, 2, 1), (8, 3, 2, 4), (33, 3, 1, 18),
    (1, 3, 1, 1), (3, 7, 2, 1)])
def test_conv_equals_flax_conv_also_when_taps_only_read_padding(size, kernel, stride,
                                                                 dilation):
  # `layers.Conv` skips kernel taps that only ever read padding (dilation >= the input size,
  # e.g. ASPP rate 36 on a 4x4 map): same values and gradients as the padded `nn.Conv`.
  x = _x(1, (2, size, size + 3, 5))
  pad = dilation * (kernel - 1) // 2
  ref = nn.Conv(4, (kernel, kernel), strides=(stride, stride), padding=((pad, pad),) * 2,
                kernel_dilation=(dilation, dilation), use_bias=True)
  ours = layers.conv(4, kernel, strides=stride, dilation=dilation, use_bias=True)
  variables = jax.tree.map(lambda a: a + 0.3, ref.init(jax.random.key(0), x))
  assert jax.tree.structure(variables) == jax.tree.structure(
      jax.eval_shape(ours.init, jax.random.key(0), x))

  def value_and_grads(module):
    return jax.jit(jax.value_and_grad(lambda v, x: jnp.sum(jnp.sin(module.apply(v, x))),
                                      argnums=(0, 1)))(variables, x)

  (a, ga), (b, gb) = value_and_grads(ref), value_and_grads(ours)
  np.testing.assert_allclose(a, b, rtol=1e-5)
  for u, v in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ref.apply(variables, x), ours.apply(variables, x), atol=1e-5)
