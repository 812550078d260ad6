"""Channel dropout = PyTorch `Dropout2d` on NHWC features."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semijax.augment import feature


def _features(dtype=jnp.float32):
  x = np.random.default_rng(0).normal(size=(2, 3, 4, 16)) + 3.0
  return jnp.asarray(x, dtype)


def test_whole_channels_rescaled_keys_independent_and_reproducible():
  x = _features()
  f = jax.jit(lambda k: feature.channel_dropout(k, x, rate=0.5))
  y = np.asarray(f(jax.random.key(1)))
  xn = np.asarray(x)
  dropped = np.all(y == 0, axis=(1, 2))                       # [B, C]
  kept = np.all(np.isclose(y, 2.0 * xn, rtol=1e-6), axis=(1, 2))
  assert np.all(dropped ^ kept)
  assert 0 < dropped.sum() < dropped.size
  a, b, c = f(jax.random.key(2)), f(jax.random.key(2)), f(jax.random.key(3))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_expectation_is_preserved():
  x = _features()
  n, rate = 2000, 0.5
  ys = jax.jit(lambda k: jax.vmap(lambda kk: feature.channel_dropout(kk, x, rate=rate))(
      jax.random.split(k, n)))(jax.random.key(4))
  mean = np.asarray(ys.mean(0))
  # Each output is x / (1 - rate) with prob 1 - rate: std of the mean is x sqrt(rate/(1-rate)/n).
  se = np.abs(np.asarray(x)) * math.sqrt(rate / (1 - rate) / n)
  assert np.all(np.abs(mean - np.asarray(x)) < 5 * se + 1e-6)
  keep = np.asarray((ys != 0).any(axis=(2, 3))).mean()
  assert abs(keep - (1 - rate)) < 5 * math.sqrt(rate * (1 - rate) / (n * 2 * 16))


def test_dtype_edge_rates_and_tracing():
  x = _features(jnp.bfloat16)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def drop(rng, x):
    return feature.channel_dropout(rng, x, rate=0.5)

  assert drop(jax.random.key(5), x).dtype == jnp.bfloat16
  drop(jax.random.key(6), x + 1)
  np.testing.assert_array_equal(feature.channel_dropout(jax.random.key(0), x, rate=0.0), x)
  assert not np.asarray(feature.channel_dropout(jax.random.key(0), x, rate=1.0)).any()
  with pytest.raises(ValueError):
    feature.channel_dropout(jax.random.key(0), x, rate=1.5)
