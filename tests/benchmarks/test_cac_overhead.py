"""The CAC negatives benchmark's bookkeeping (no timing): configs per negative count, the
summary against 500 negatives, and Fig. 6 per epoch from a run's logs."""

import json

from experiments.benchmarks import cac_overhead
from semijax.methods import cac


def test_negative_counts_come_from_the_batch_then_the_memory():
  preset = cac_overhead.PRESETS["recipe"]
  per_step = 2 * preset["unlabeled"] * (preset["crop"] // 8) ** 2   # 3200 at batch 1, 320 px
  for n in (500, 2000, 3200, 6400, 19200, 25600):
    c = cac_overhead.config_for(n, preset, chunk_size=8000)
    assert c.model.name == "deeplabv3plus_resnet101" and c.model.kwargs.stem == "torchvision"
    assert c.cac.memory_steps == 0 and c.model.pretrained == ""
    slots = cac.memory_slots(c.cac, unlabeled_batch=c.data.unlabeled_batch,
                             pixels_per_view=(preset["crop"] // 8) ** 2)
    assert cac_overhead._capacity(c) == n   # pylint: disable=protected-access
    if n <= per_step:
      assert c.cac.negatives_per_view == n // 2 and slots == 0
    else:
      assert c.cac.negatives_per_view == 0 and slots == n - per_step


def test_summary_relative_to_500():
  rows = {500: {"step_seconds_median": 10.0, "memory": {"peak": 1000}},
          19200: {"step_seconds_median": 10.5, "memory": {"peak": 1080}}}
  out = cac_overhead.summary(rows)
  assert abs(out[19200]["time_vs_500"] - 1.05) < 1e-9
  assert abs(out[19200]["peak_vs_500"] - 1.08) < 1e-9 and out["target_met"]
  rows[19200]["memory"]["peak"] = 1200
  assert not cac_overhead.summary(rows)["target_met"]


def test_negative_precision_per_epoch(tmp_path):
  config = {"data": {"split": "1/16", "unlabeled_batch": 16,
                     "embedded": {"num_train": 3200}}}
  (tmp_path / "config.json").write_text(json.dumps(config))
  (tmp_path / "results.json").write_text(json.dumps({"miou_teacher": 1.0}))
  key = "train/contrast/negative_pairs_precision"
  rows = [{"step": 50, "train/loss": 1.0},
          {"step": 350, key: 0.8, key + "_random": 0.5},
          {"step": 400, key: 0.9, key + "_random": 0.6},    # epoch 3: steps 376-562
          {"step": 550, key: 0.7, key + "_random": 0.55},
          {"step": 600, key: 0.7, key + "_random": 0.55}]
  (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
  out = cac_overhead.negative_precision_per_epoch(str(tmp_path))
  assert out["steps_per_epoch"] == 3000 / 16     # 187.5 steps per pass over the unlabeled set
  assert out["epochs"][2]["negative_sampling"] == 0.8
  assert abs(out["epochs"][3]["negative_sampling"] - 0.8) < 1e-9
  assert abs(out["epochs"][3]["random"] - 0.575) < 1e-9 and out["epochs"][3]["windows"] == 2
  assert out["epochs"][4]["negative_sampling"] == 0.7
