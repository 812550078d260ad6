"""Pieces of one paper in another paper's method, by configuration only."""

import importlib

import jax
import numpy as np
import pytest

from experiments.benchmarks import step_time
from semijax import methods, parallel
from semijax.train import loop, step as step_lib


def _train(name, arg, steps=3, **overrides):
  config = importlib.import_module(f"experiments.configs.{name}").get_config(arg)
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
    batch = step_time.synthetic_batch(config, run.info.num_classes, True, seed=t)
    state, metrics = fn(state, parallel.put_batch(batch, run.mesh))
    history.append(jax.device_get(metrics))
  return config, state, history


def test_mean_teacher_with_dgcl_contrast_and_cplg_pseudo_labels():
  """Mean teacher + DGCL's density-guided contrast and bank + DSSN's class-aware rule."""
  config, state, history = _train(
      "mean_teacher", "smoke,terms=dgcl_contrast", steps=4,
      **{"pseudo_label.rule": "cplg", "dgcl_contrast.bank_size": 8,
         "dgcl_contrast.push_per_class": 8, "dgcl_contrast.min_bank_size": 4})
  assert config.method.terms == ("dgcl_contrast",)
  assert np.asarray(state.method_state["dgcl_contrast"]["bank"].count).max() == 8
  for m in history:
    assert np.isfinite(m["loss"]) and "loss_contra" in m and "dgcl/num_classes" in m
  assert any(m["loss_contra"] > 0 for m in history)   # the bank filled and the term ran


def test_dgcl_with_dssn_dual_level_consistency():
  """DGCL's recipe + DSSN's feature-level siamese branch as an extra term, CPLG-free."""
  config, _, history = _train("dgcl", "smoke,terms=dgcl_contrast+dssn_feature_level")
  assert config.method.terms == ("dgcl_contrast", "dssn_feature_level")
  for m in history:
    assert np.isfinite(m["loss"])
    assert m["loss_cl_feature"] > 0 and m["loss_w2s_feature"] >= 0


def test_mean_teacher_with_two_views_and_image_consistency():
  _, _, history = _train("mean_teacher", "smoke,terms=dssn_image_consistency",
                         **{"mean_teacher.strong_views": 2})
  assert all(np.isfinite(m["loss"]) and m["loss_cl_image"] > 0 for m in history)


def test_image_consistency_needs_two_views():
  with pytest.raises(ValueError, match="two strong views"):
    _train("mean_teacher", "smoke,terms=dssn_image_consistency", steps=1)


def test_unknown_term_or_rule_lists_the_registered_ones():
  from experiments.configs import mean_teacher  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="dgcl_contrast"):
    mean_teacher.get_config("terms=no_such_term")
  config = mean_teacher.get_config("smoke")
  config.pseudo_label.rule = "no_such_rule"
  with pytest.raises(ValueError, match="confidence"):
    methods.get("mean_teacher")(config)
  # A term selected on the command line without its block: the fix is named.
  config = mean_teacher.get_config("smoke")
  config.method.terms = ("dgcl_contrast",)
  with pytest.raises(ValueError, match="terms=dgcl_contrast"):
    methods.get("mean_teacher")(config)
