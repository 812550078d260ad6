"""The pre-compile device-memory estimate and the fits-the-device check."""

import jax
import jax.numpy as jnp
import pytest

from semijax.models import memory, registry

F32 = 4


def test_liveness_of_a_chain_and_of_kept_values():
  x = jax.ShapeDtypeStruct((1000,), jnp.float32)
  # x -> a -> b: x dies once a exists, a once b exists; two arrays alive at most.
  assert memory.estimate_step_bytes(lambda x: (x * 2.0) + 1.0, x) == 2 * 1000 * F32
  # x is read again at the end, so x, a and b are alive together.
  assert memory.estimate_step_bytes(lambda x: ((x * 2.0) + 1.0) * x, x) == 3 * 1000 * F32


def test_scan_outputs_count_in_full():
  # A scan that saves a [100, 1000] stack (as a scanned network saves its residuals).
  def f(x):
    def body(c, _):
      return c + 1.0, c * 2.0
    return jax.lax.scan(body, x, None, length=100)[1]
  peak = memory.estimate_step_bytes(f, jax.ShapeDtypeStruct((1000,), jnp.float32))
  assert 100 * 1000 * F32 <= peak <= 103 * 1000 * F32


def test_estimate_is_near_xla_for_a_train_step():
  # Forward + backward of the small DeepLabv3+ on 8 images: the traced estimate against
  # XLA's compiled memory analysis (arguments + outputs + temporaries - aliased).
  model = registry.build_model('deeplabv3plus_small', 5)
  x = jnp.zeros((8, 48, 48, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)

  def step(params, batch_stats, x):
    def loss(p):
      out, state = model.apply({'params': p, 'batch_stats': batch_stats}, x, train=True,
                               mutable=['batch_stats'], rngs={'dropout': jax.random.key(0)})
      return jnp.mean(out['logits'] ** 2), state
    return jax.grad(loss, has_aux=True)(params)

  est = memory.estimate_step_bytes(step, variables['params'], variables['batch_stats'], x)
  m = jax.jit(step).lower(variables['params'], variables['batch_stats'], x).compile()
  m = m.memory_analysis()
  xla = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
         - m.alias_size_in_bytes)
  assert 0.5 * xla <= est <= 2.0 * xla, (est, xla)


def test_per_device_and_check_fits():
  batch = {'image': jax.ShapeDtypeStruct((16, 8, 8, 3), jnp.uint8)}
  assert memory.per_device(batch, 4)['image'].shape == (4, 8, 8, 3)
  with pytest.raises(ValueError, match='3 devices'):
    memory.per_device(batch, 3)
  gib = 2**30
  assert memory.check_fits(70 * gib, limit_bytes=80 * gib) is None
  message = memory.check_fits(75 * gib, limit_bytes=80 * gib)
  assert message and '75.0 GiB' in message and 'model.remat' in message
  # A CPU reports no memory limit: nothing to compare with.
  assert memory.check_fits(10**15, jax.devices('cpu')[0]) is None


def test_device_memory_of_known_accelerators():
  class FakeDevice:
    device_kind = 'NVIDIA H100 80GB HBM3'

    def memory_stats(self):
      return None

  assert memory.device_memory_bytes(FakeDevice()) == 80 * 10**9
  FakeDevice.device_kind = 'NVIDIA H200'
  assert memory.device_memory_bytes(FakeDevice()) == 141 * 10**9
  FakeDevice.memory_stats = lambda self: {'bytes_limit': 123}
  assert memory.device_memory_bytes(FakeDevice()) == 123


def test_step_fits_message_traces_only_with_a_known_device_size():
  calls = []

  def step(state, batch):
    calls.append(batch['image'].shape)
    return state * 2.0, jnp.sum(batch['image'])

  state = jax.ShapeDtypeStruct((1000,), jnp.float32)
  batch = {'image': jax.ShapeDtypeStruct((8, 1000), jnp.float32)}

  class Small:
    device_kind = 'test device'

    def memory_stats(self):
      return {'bytes_limit': 10_000}

  message = memory.step_fits_message(step, state, batch, num_devices=4, device=Small())
  assert calls == [(2, 1000)] and message and 'test device' in message
  assert memory.step_fits_message(step, state, batch, num_devices=4,
                                  device=jax.devices('cpu')[0]) is None
  assert len(calls) == 1   # a CPU (no size) is never traced
