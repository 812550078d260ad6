"""The DGCL-overhead benchmark runs end to end at a tiny scale and reports what it promises."""

import json

import jax
import numpy as np
import pytest

from experiments.benchmarks import dgcl_overhead


@pytest.fixture(autouse=True, scope="module")
def _fast_compiles():
  # Compile-bound on CPU; XLA's optimisation passes only cost time here.
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


def test_voc_like_labels_match_the_requested_distribution():
  labels = dgcl_overhead.voc_like_labels(np.random.default_rng(0), 16, 129, 21, 0.2)
  stats = dgcl_overhead.label_stats(labels, 21)
  assert labels.shape == (16, 129, 129)
  assert 0.12 < stats["ignore_fraction"] < 0.3
  assert 0.55 < stats["background_fraction_of_labelled"] < 0.85
  assert 5 <= stats["classes_present"] <= 21
  assert set(np.unique(labels)) <= set(range(21)) | {255}


def test_small_scale_run():
  s = dgcl_overhead.settings_for("small", model_batches=(1, 2), target_batch=4, reps=1,
                                 dgcl_inner=1)
  r = dgcl_overhead.run(s, measure_peak=False)
  json.dumps(r)  # JSON-able
  t = r["timings"]
  for name in ("dgcl_f32", "dgcl_bf16", "dgcl_f32_push_bank", "dgcl_f32_negatives",
               "model_b1", "model_b2"):
    assert t[name]["median_s"] > 0, name
  assert t["dgcl_f32"]["aux_last"]["bank_full"] == 1.0
  assert t["dgcl_f32"]["aux_last"]["num_classes"] >= 1
  assert t["dgcl_f32"]["flops_estimate"] >= t["dgcl_f32"]["flops_density_analytic"] > 0
  assert t["model_b2"]["memory"]["peak_estimate_bytes"] > 0
  assert r["model_batch_measured"] == [1, 2]
  assert r["model_extrapolated"] is True
  assert r["model_step_s_at_target"] > 0
  assert np.isfinite(r["ratios"]["dgcl_f32"]["ratio_median"])
  assert r["model"]["decoder_feature_size"] == [s.feature_size] * 2
