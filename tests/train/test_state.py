"""EMA teacher: decay schedules and the incremental update."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from semijax.train import schedules, state as state_lib


@pytest.mark.parametrize("step", [0, 1, 5, 99, 5000])
def test_u2pl_warmup_is_min_of_one_minus_inverse_and_decay(step):
  got = state_lib.ema_decay(step, decay=0.999, warmup="u2pl")
  np.testing.assert_allclose(got, min(1 - 1 / (step + 1), 0.999), rtol=1e-6)


def test_teacher_copies_student_before_start_step():
  assert float(state_lib.ema_decay(3, decay=0.99, warmup="u2pl", start_step=10)) == 0.0
  assert float(state_lib.ema_decay(10, decay=0.99, warmup="u2pl", start_step=10)) == 0.0
  np.testing.assert_allclose(state_lib.ema_decay(11, decay=0.99, warmup="u2pl", start_step=10),
                             0.5)


def test_cosine_schedule_follows_alonso():
  total = 1000
  for t in (1, 10, 500, 999):
    m = 1 - 0.005 * (np.cos(np.pi * t / total) + 1) / 2
    m = min(1 - 1 / (10 * t + 1), m)
    np.testing.assert_allclose(
        state_lib.ema_decay(t, decay=0.995, warmup="cosine", total_steps=total), m, rtol=1e-6)


def test_unknown_warmup_is_an_error():
  with pytest.raises(ValueError, match="u2pl"):
    state_lib.ema_decay(0, decay=0.9, warmup="linear")


def _state():
  params = {"backbone": {"w": jnp.ones((2,))}, "head": {"w": jnp.full((3,), 2.0)}}
  stats = {"bn": {"mean": jnp.zeros((2,))}}
  tx = optax.sgd(0.1)
  return state_lib.TrainState.create(apply_fn=None, params=params, tx=tx, batch_stats=stats)


def test_update_teacher_is_incremental_update_of_params_and_optionally_stats():
  st = _state()
  st = st.replace(params=jax.tree.map(lambda x: x + 1.0, st.params),
                  batch_stats=jax.tree.map(lambda x: x + 4.0, st.batch_stats))
  out = state_lib.update_teacher(st, jnp.float32(0.75), include_batch_stats=True)
  np.testing.assert_allclose(out.ema_params["backbone"]["w"], 0.75 * 1 + 0.25 * 2)
  np.testing.assert_allclose(out.ema_batch_stats["bn"]["mean"], 0.25 * 4)
  own = state_lib.update_teacher(st, jnp.float32(0.75), include_batch_stats=False)
  np.testing.assert_allclose(own.ema_batch_stats["bn"]["mean"], 0.0)


def test_poly_schedule_and_head_multiplier():
  lr = schedules.poly_schedule(0.01, 100, power=0.9)
  np.testing.assert_allclose(lr(0), 0.01)
  np.testing.assert_allclose(lr(50), 0.01 * 0.5 ** 0.9, rtol=1e-6)
  np.testing.assert_allclose(lr(100), 0.0, atol=1e-12)
  st = _state()
  tx = schedules.make_optimizer(name="sgd", base_lr=0.1, total_steps=10, head_lr_mult=10.0,
                                momentum=0.0, weight_decay=0.0, params=st.params)
  grads = jax.tree.map(jnp.ones_like, st.params)
  updates, _ = tx.update(grads, tx.init(st.params), st.params)
  np.testing.assert_allclose(updates["backbone"]["w"], -0.1)
  np.testing.assert_allclose(updates["head"]["w"], -1.0)


def test_sgd_matches_pytorch_semantics_with_weight_decay_and_momentum():
  # torch.optim.SGD: d = g + wd * p; buf = m * buf + d; p -= lr * buf
  tx = schedules.make_optimizer(name="sgd", base_lr=0.1, total_steps=10 ** 9, power=0.9,
                                momentum=0.9, weight_decay=0.01)
  p = jnp.array([1.0, -2.0])
  opt = tx.init(p)
  p_ref, buf = np.array([1.0, -2.0]), np.zeros(2)
  for g in (np.array([0.5, 0.1]), np.array([-0.3, 0.2]), np.array([0.0, 1.0])):
    updates, opt = tx.update(jnp.asarray(g), opt, p)
    p = optax.apply_updates(p, updates)
    d = g + 0.01 * p_ref
    buf = 0.9 * buf + d
    p_ref = p_ref - 0.1 * buf
  np.testing.assert_allclose(p, p_ref, rtol=1e-5)
