"""Each method's train step on a tiny batch: finite losses, its metrics, its state updates."""

import importlib

import jax
import numpy as np
import pytest

from experiments.benchmarks import step_time
from semijax import parallel
from semijax.train import loop, step as step_lib

EXPECTED = {
    "supervised": {"loss_sup"},
    "mean_teacher": {"loss_sup", "loss_unsup", "pseudo_label_ratio"},
    "dgcl": {"loss_sup", "loss_unsup", "loss_contra", "bank/fill_mean", "dgcl/num_anchors",
             "pseudo_drop_percent", "contra_drop_percent"},
    "dssn": {"loss_sup", "loss_w2s_image", "loss_w2s_feature", "loss_cl_image",
             "loss_cl_feature", "pseudo_label_ratio_strong1"},
}


def _run_steps(name, steps=3, **overrides):
  config = importlib.import_module(f"experiments.configs.{name}").get_config("smoke")
  config.train.num_devices = 1
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  run = loop.Run(config, "/tmp/unused")
  state = run.init_state()
  fn = jax.jit(step_lib.make_train_step(run.model, run.method, config))
  history = []
  for t in range(steps):
    batch = step_time.synthetic_batch(config, run.info.num_classes, run.method.uses_unlabeled,
                                      seed=t)
    state, metrics = fn(state, parallel.put_batch(batch, run.mesh))
    history.append(jax.device_get(metrics))
  return run, state, history


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_method_step_is_finite_and_reports_its_terms(name):
  run, state, history = _run_steps(name)
  for metrics in history:
    assert EXPECTED[name] <= set(metrics), sorted(metrics)
    for k, v in metrics.items():
      assert np.isfinite(v), (k, v)
    assert metrics["finite"] == 1.0
  assert int(state.step) == 3 and int(state.skipped_steps) == 0
  # The teacher follows the student (EMA) but is not the student after several steps.
  diff = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                      state.params, state.ema_params)
  assert max(jax.tree.leaves(diff)) > 0


def test_dgcl_bank_fills_and_loss_starts_when_full():
  run, state, history = _run_steps("dgcl", steps=4, **{"dgcl_contrast.bank_size": 8,
                                                        "dgcl_contrast.push_per_class": 8,
                                                        "dgcl_contrast.min_bank_size": 4})
  counts = np.asarray(state.method_state["dgcl_contrast"]["bank"].count)
  assert counts.max() == 8 and counts.min() > 0
  fills = [h["bank/fill_mean"] for h in history]
  assert fills[0] < fills[-1]
  # The contrastive term is 0 before every class bank is full, then positive.
  assert history[0]["loss_contra"] == 0.0
  full = [h for h in history if h["dgcl/bank_full"] == 1.0]
  assert all(h["loss_contra"] > 0 for h in full)


def test_dssn_skips_image_level_terms_at_the_first_step():
  _, _, history = _run_steps("dssn", steps=2)
  assert history[0]["loss_w2s_image"] == 0.0
  assert history[0]["ema_keep_rate"] == 0.0


def test_warmup_step_is_supervised_only_and_teacher_copies_student():
  config = importlib.import_module("experiments.configs.dgcl").get_config("smoke")
  config.train.num_devices = 1
  config.train.supervised_warmup_steps = 5
  run = loop.Run(config, "/tmp/unused")
  state = run.init_state()
  bank_before = jax.device_get(state.method_state)
  warm = jax.jit(step_lib.make_train_step(run.model, run.method, config, warmup=True))
  batch = step_time.synthetic_batch(config, run.info.num_classes, True, seed=0)
  state, metrics = warm(state, parallel.put_batch(batch, run.mesh))
  assert set(metrics) >= {"loss", "loss_sup"} and "loss_unsup" not in metrics
  assert metrics["ema_keep_rate"] == 0.0 and int(state.step) == 1
  # Teacher = student, parameters and BatchNorm statistics; the banks are untouched.
  for a, b in zip(jax.tree.leaves((state.params, state.batch_stats)),
                  jax.tree.leaves((state.ema_params, state.ema_batch_stats))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  after = jax.device_get(state.method_state)
  for a, b in zip(jax.tree.leaves(bank_before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(a, b)
  assert metrics["loss"] == metrics["loss_sup"]
