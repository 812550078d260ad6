"""The side-by-side method cost benchmark runs and reports ratios to its reference."""

import json

from absl import flags
from absl.testing import flagsaver

from experiments.benchmarks import method_cost


def test_smoke_methods_side_by_side(tmp_path):
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["method_cost"])
  out = tmp_path / "cost.json"
  with flagsaver.flagsaver(methods=["supervised", "mean_teacher"], rounds=2, steps=1,
                           config_arg="smoke", out=str(out)):
    method_cost.main([])
  result = json.loads(out.read_text())
  sup, mt = result["methods"]["supervised"], result["methods"]["mean_teacher"]
  assert mt["time_ratio_to_reference"] == 1.0 and mt["flops_ratio_to_reference"] == 1.0
  # Mean teacher adds a teacher forward and a strong view: more FLOPs than supervised.
  assert sup["flops_ratio_to_reference"] < 1.0 and sup["step_seconds_median"] > 0
