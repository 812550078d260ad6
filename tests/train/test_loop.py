"""End to end: a smoke run trains, evaluates, checkpoints, and resumes exactly."""

import json
import os

import jax
import numpy as np
import pytest

from experiments.configs import mean_teacher, supervised
from semijax import checkpoint
from semijax.train import evaluation, loop


def _params(workdir):
  run, state, step = evaluation.restore(workdir, "latest")
  return jax.device_get(state), step


@pytest.mark.slow
def test_smoke_train_then_resume_continues_identically(tmp_path):
  config = mean_teacher.get_config("smoke")
  full = str(tmp_path / "full")
  res = loop.train_and_evaluate(config, full, progress=False)
  assert res["steps"] == 4 and 0 <= res["miou_teacher"] <= 100
  assert os.path.exists(res["figure"]) and os.path.isdir(res["tensorboard"])
  lines = [json.loads(l) for l in open(os.path.join(full, "metrics.jsonl"))]
  assert any("train/loss_unsup" in l for l in lines)
  assert any("val_teacher/miou" in l for l in lines)

  split = str(tmp_path / "split")
  out = loop.train_and_evaluate(config, split, progress=False, max_steps=2)
  assert out == {"stopped_at": 2}
  loop.train_and_evaluate(config, split, progress=False)

  a, step_a = _params(full)
  b, step_b = _params(split)
  assert step_a == step_b == 4
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_checkpoint_of_another_method_is_refused(tmp_path):
  workdir = str(tmp_path / "run")
  loop.train_and_evaluate(supervised.get_config("smoke"), workdir, progress=False, max_steps=2)
  with pytest.raises(checkpoint.CheckpointMismatchError, match="method"):
    loop.train_and_evaluate(mean_teacher.get_config("smoke"), workdir, progress=False)
