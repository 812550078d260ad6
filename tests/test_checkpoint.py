"""Resume safety (`config_differences`, `check_resume_config`) and orbax's read-only notice."""

import json
import logging
import os

import numpy as np
import pytest
from absl import logging as absl_logging

from experiments.configs import base, dgcl, mean_teacher
from semijax import checkpoint


def saved_json(config) -> dict:
  """What the trainer writes to `config.json` (tuples become lists)."""
  return json.loads(checkpoint.config_fingerprint(config))


def test_same_config_has_no_differences_after_the_json_round_trip():
  c = dgcl.get_config("split=1/8")
  assert checkpoint.config_differences(saved_json(c), c) == []
  assert checkpoint.config_differences(c, dgcl.get_config("split=1/8")) == []


def test_result_changing_fields_are_listed_with_both_values():
  saved = saved_json(mean_teacher.get_config("split=1/8"))
  current = mean_teacher.get_config("split=1/4,seed=2")
  current.mean_teacher.unsup_weight = 0.5       # a method hyperparameter
  current.train.total_steps = 600               # the schedule
  current.data.scale_range = (0.5, 2.0)         # augmentation (a tuple against a JSON list)
  assert checkpoint.config_differences(saved, current) == [
      "data.scale_range: checkpoint [0.75, 1.25], this run [0.5, 2.0]",
      "data.split: checkpoint '1/8', this run '1/4'",
      "mean_teacher.unsup_weight: checkpoint 1.0, this run 0.5",
      "seed: checkpoint 0, this run 2",
      "train.total_steps: checkpoint 1200, this run 600",
  ]


def test_method_model_and_data_fields_count():
  saved = saved_json(mean_teacher.get_config("split=1/8"))
  for change in ({"method.name": "dgcl"}, {"model.kwargs.widths": (8, 8, 16, 16)},
                 {"data.root": "/data/other"}, {"data.dataset": "folder"},
                 {"data.split_seed": 1}, {"optim.base_lr": 0.01}, {"eval.mode": "sliding_window"}):
    current = mean_teacher.get_config("split=1/8")
    current.update_from_flattened_dict(change)
    (field,) = change
    diffs = checkpoint.config_differences(saved, current)
    assert len(diffs) == 1 and diffs[0].startswith(field + ":"), (change, diffs)


def test_cadence_logging_and_workers_may_differ():
  saved = saved_json(mean_teacher.get_config("split=1/8"))
  current = mean_teacher.get_config("split=1/8")
  current.train.log_every, current.train.eval_every = 7, 100
  current.train.checkpoint_every, current.train.keep_checkpoints = 50, 5
  current.train.eval_student, current.data.num_workers = False, 4
  current.data.eval_batch, current.train.num_devices = 8, 2
  assert checkpoint.config_differences(saved, current) == []
  fields = checkpoint.result_fields(current)
  assert "train.log_every" not in fields and "data.split" in fields and "seed" in fields
  assert set(checkpoint.MAY_DIFFER_ON_RESUME) <= set(checkpoint._flatten(base.get_config()))


def test_device_count_counts_when_it_sets_the_batchnorm_groups():
  c = mean_teacher.get_config("split=1/8")
  assert "train.num_devices" not in checkpoint.result_fields(c)
  c.train.sync_bn = False    # bn_groups 0 and no recipe: one statistic group per device
  assert "train.num_devices" in checkpoint.result_fields(c)
  c.train.bn_groups = 4
  assert "train.num_devices" not in checkpoint.result_fields(c)


def test_fields_only_one_side_has_are_not_compared():
  c = mean_teacher.get_config("split=1/8")
  saved = saved_json(c)
  block = next(v for v in saved.values() if isinstance(v, dict) and v)
  block.pop(next(iter(block)))                  # a config written before that field existed
  saved["retired_field"] = 3
  assert checkpoint.config_differences(saved, c) == []


def test_check_resume_config_refuses_and_writes_nothing(tmp_path):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  checkpoint.check_resume_config(workdir, mean_teacher.get_config("split=1/4"))  # no config.json
  saved = mean_teacher.get_config("split=1/8")
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(checkpoint.config_fingerprint(saved))
  before = {p: os.path.getmtime(os.path.join(workdir, p)) for p in os.listdir(workdir)}
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r"trained with another config.*data\.split: checkpoint '1/8', this run "
                           r"'1/4'.*results\.json would describe neither.*may differ on resume: "
                           r"train\.log_every"):
    checkpoint.check_resume_config(workdir, mean_teacher.get_config("split=1/4"))
  assert {p: os.path.getmtime(os.path.join(workdir, p)) for p in os.listdir(workdir)} == before
  checkpoint.check_resume_config(workdir, mean_teacher.get_config("split=1/8"))
  # An explicit `saved` (e.g. from checkpoint metadata) wins over config.json.
  with pytest.raises(checkpoint.CheckpointMismatchError, match="seed: checkpoint 5, this run 0"):
    checkpoint.check_resume_config(workdir, saved, saved=saved_json(
        mean_teacher.get_config("split=1/8,seed=5")))
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write("[1, 2")
  with pytest.raises(checkpoint.CheckpointMismatchError, match="config.json: cannot read"):
    checkpoint.check_resume_config(workdir, saved)


def test_resume_opens_read_only_without_orbax_notice(tmp_path, caplog, capfd):
  workdir = str(tmp_path / "run")
  ckpt = checkpoint.Checkpointer(workdir, async_save=False)
  ckpt.save(1, {"w": np.arange(3.0, dtype=np.float32)}, {"next_index": 1}, {"model": "m"})
  ckpt.close()
  caplog.set_level(logging.WARNING)
  reader = checkpoint.Checkpointer(workdir, read_only=True)   # what a resume opens first
  assert reader.latest_step() == 1
  reader.manager.close()
  assert checkpoint.ORBAX_READ_ONLY_NOTICE not in caplog.text
  assert "read_only=True" not in caplog.text     # orbax's options notice, avoided at the source
  err = capfd.readouterr().err
  assert "read only" not in err and "read_only" not in err
  # Only that notice, only while the manager opens: the same text logged later gets through.
  absl_logging.warning("Given directory is read only=%s (test)", workdir)
  assert "read only" in caplog.text
