"""The DGCL-overhead benchmark runs end to end at a tiny scale and reports what it promises."""

import json

import numpy as np
import pytest

from experiments.benchmarks import dgcl_overhead

pytestmark = pytest.mark.usefixtures("fast_compiles")


def test_voc_like_labels_match_the_requested_distribution():
  labels = dgcl_overhead.voc_like_labels(np.random.default_rng(0), 16, 129, 21, 0.2)
  stats = dgcl_overhead.label_stats(labels, 21)
  assert labels.shape == (16, 129, 129)
  assert 0.12 < stats["ignore_fraction"] < 0.3
  assert 0.55 < stats["background_fraction_of_labelled"] < 0.85
  assert 5 <= stats["classes_present"] <= 21
  assert set(np.unique(labels)) <= set(range(21)) | {255}


def test_small_scale_run():
  # One model batch, no bf16 variant and no breakdown keep it compile-light (< 20 s with a
  # cold compilation cache on 2 busy cores); the fit over several batches is checked on
  # synthetic timings below, the breakdown and bf16 paths by the official-scale run.
  s = dgcl_overhead.settings_for("small", model_batches=(1,), target_batch=2, reps=1,
                                 dgcl_inner=1, bf16_variant=False, breakdown=False)
  r = dgcl_overhead.run(s, measure_peak=False)
  json.dumps(r)  # JSON-able
  t = r["timings"]
  assert set(t) == {"dgcl_f32", "model_b1"}
  for name in t:
    assert t[name]["median_s"] > 0, name
  assert t["dgcl_f32"]["aux_last"]["bank_full"] == 1.0
  assert t["dgcl_f32"]["aux_last"]["num_classes"] >= 1
  assert t["dgcl_f32"]["flops_estimate"] >= t["dgcl_f32"]["flops_density_analytic"] > 0
  assert t["model_b1"]["memory"]["peak_estimate_bytes"] > 0
  assert r["model_batch_measured"] == [1]
  assert r["model_extrapolated"] is True
  assert r["model_step_s_at_target"] == pytest.approx(2 * t["model_b1"]["median_s"])
  assert np.isfinite(r["ratios"]["dgcl_f32"]["ratio_median"])
  assert r["model"]["decoder_feature_size"] == [s.feature_size] * 2


def test_summarize_extrapolates_linearly_and_reports_ratios():
  def entry(median, flops=0.0):
    return {"median_s": median, "min_s": median * 0.9, "xla_flops": flops,
            "flops_estimate": flops}
  result = {
      "settings": {"target_batch": 16, "model_batches": [2, 4, 8]},
      "timings": {"model_b2": entry(5.0, 2e12), "model_b4": entry(9.0, 4e12),
                  "model_b8": entry(17.0, 8e12), "dgcl_f32": entry(3.3, 1e11),
                  "dgcl_f32_push_bank": entry(1.1)}}
  r = dgcl_overhead.summarize(result)
  assert r["model_extrapolated"] is True
  assert r["model_fit"]["slope_s_per_image"] == pytest.approx(2.0)
  assert r["model_fit"]["intercept_s"] == pytest.approx(1.0)
  assert r["model_step_s_at_target"] == pytest.approx(33.0)
  assert r["model_step_s_at_target_lowest_estimate"] == pytest.approx(33.0)  # 16 x 17/8 = 34
  assert r["model_flops_at_target"] == pytest.approx(16e12)
  ratio = r["ratios"]["dgcl_f32"]
  assert ratio["ratio_median"] == pytest.approx(0.1)
  assert ratio["flops_ratio"] == pytest.approx(1e11 / 16e12)
  assert ratio["meets_target_15pct"] is True
  assert r["breakdown_share_of_dgcl_f32"] == {"f32_push_bank": pytest.approx(1 / 3)}
