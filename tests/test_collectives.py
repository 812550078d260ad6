"""The axis_name contract of `semijax.collectives`: global values, exact gradient shares."""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from semijax import collectives, ops


def _loss(x, axis_name=None):
  # A loss that couples devices: squared distance of each row to the global mean row.
  g = collectives.all_gather(x, axis_name)
  centre = lax.stop_gradient(jnp.mean(g, axis=0))
  return ops.masked_mean(jnp.sum((x - centre) ** 2, -1), jnp.ones(x.shape[0]),
                         axis_name=axis_name)


def test_pmap_value_is_global_and_gradients_are_shares():
  x = jax.random.normal(jax.random.key(0), (16, 3))
  value, grad = jax.value_and_grad(_loss)(x)
  pv, pg = jax.pmap(jax.value_and_grad(lambda a: _loss(a, "d")), axis_name="d")(x.reshape(8, 2, 3))
  np.testing.assert_allclose(pv, np.full(8, value), rtol=1e-6)
  np.testing.assert_allclose(pg.reshape(16, 3), grad, rtol=1e-5, atol=1e-7)


def test_shard_map_gradient_of_replicated_param_is_global(mesh8):
  x = jax.random.normal(jax.random.key(1), (16, 3))
  w = jnp.array([1.0, 2.0, 3.0])
  ref = jax.grad(lambda w: _loss(x * w))(w)

  def per_device(w, x):
    return jax.grad(lambda w: _loss(x * w, "data"))(w)

  fn = jax.shard_map(per_device, mesh=mesh8, in_specs=(P(), P("data")), out_specs=P())
  got = jax.jit(fn)(w, jax.device_put(x, NamedSharding(mesh8, P("data"))))
  np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_same_rng_broadcasts_device_zero_key():
  keys = jax.random.split(jax.random.key(3), 8)
  out = jax.pmap(lambda k: jax.random.key_data(collectives.same_rng(k, "d")), axis_name="d")(keys)
  np.testing.assert_array_equal(out, np.broadcast_to(jax.random.key_data(keys[0]), out.shape))


def test_local_rows_inverts_all_gather():
  x = jnp.arange(16.0).reshape(8, 2)
  out = jax.pmap(lambda a: collectives.local_rows(collectives.all_gather(a, "d"), "d"),
                 axis_name="d")(x.reshape(8, 1, 2))
  np.testing.assert_array_equal(out.reshape(8, 2), x)
