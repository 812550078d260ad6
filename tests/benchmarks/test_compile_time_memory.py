"""The compile-time and memory benchmarks: their selection logic and one small measurement."""

import pytest

from experiments.benchmarks import compile_time, memory, recipe_step


def _entry(method, remat, peak_gb, recipe_layout=True):
  return {"method": method, "remat": remat, "peak_gb": peak_gb, "recipe_layout": recipe_layout}


def test_recommend_picks_the_cheapest_setting_that_fits_at_the_recipe_layout():
  entries = [_entry("dgcl", "none", 24.0), _entry("dgcl", "blocks", 12.0),
             _entry("mt", "none", 95.0), _entry("mt", "blocks", 41.0),
             _entry("mt", "none", 20.0, recipe_layout=False),
             _entry("big", "none", 300.0), _entry("big", "blocks", 120.0)]
  got = memory.recommend(entries, 80.0)
  assert got["dgcl"]["remat"] == "none"
  assert got["mt"]["remat"] == "blocks" and got["mt"]["peak_gb"] == {"none": 95.0,
                                                                     "blocks": 41.0}
  assert got["big"]["remat"] is None


def test_recipe_step_builds_the_recipe_without_data():
  config = recipe_step.recipe_config("dgcl")
  step = recipe_step.build_step(recipe_step.override(config, **{"model.remat": "blocks"}),
                                num_devices=2)
  assert step.info["remat"] == "blocks" and step.info["scan_blocks"]
  assert step.info["num_params"] > 40_000_000
  assert step.batch["labeled"]["image"].shape == (16, 513, 513, 3)
  assert step.model.backbone.remat == "blocks"


@pytest.mark.slow
def test_compile_time_of_a_small_step():
  e = compile_time.measure("supervised", True, embedded=True)
  assert e["compile_cpu_seconds"] > 0 and e["fusions"] > 0
  assert e["model_flops"] > 0 and e["xla_flops"] > 0
