"""The Alonso-overhead benchmark runs end to end at a tiny scale and reports what it promises."""

import json

import numpy as np
import pytest

from experiments.benchmarks import alonso_overhead

pytestmark = pytest.mark.usefixtures("fast_compiles")


def test_small_scale_run():
  s = alonso_overhead.settings_for("small", model_batches=(1, 2), reps=1)
  r = alonso_overhead.run(s)
  json.dumps(r)  # JSON-able
  t = r["timings"]
  assert set(t) == {"contrast_tiles", "contrast_dense", "model_b1", "model_b2",
                    "teacher_forward_b1", "teacher_forward_b2"}
  for name, entry in t.items():
    assert entry["median_s"] > 0 and entry["xla_flops"] > 0, name
  assert r["extrapolated"] and r["model_step_s"]["at_target"] > 0
  for name in ("contrast_tiles", "contrast_dense", "teacher_forward"):
    assert r["ratios"][name]["time_ratio_median"] > 0
    assert r["ratios"][name]["flops_ratio"] > 0


def test_fit_extrapolates_linearly():
  fit = alonso_overhead._fit([1, 2], [3.0, 5.0], 28)  # pylint: disable=protected-access
  np.testing.assert_allclose(fit["at_target"], 1.0 + 2.0 * 28)
  fit = alonso_overhead._fit  # pylint: disable=protected-access
  assert fit([2], [4.0], 28)["at_target"] == 56.0
  assert fit([1, 2], [5.0, 4.0], 28)["at_target"] == 56.0  # noisy, decreasing: proportional
