"""End to end: a smoke run trains, evaluates, checkpoints, and resumes exactly."""

import json
import os

import jax
import numpy as np
import pytest

from experiments.configs import mean_teacher, supervised
from semijax import checkpoint
from semijax.data import image_io
from semijax.train import evaluation, loop


def _params(workdir):
  run, state, step = evaluation.restore(workdir, "latest")
  return jax.device_get(state), step


@pytest.mark.slow
def test_smoke_train_then_resume_continues_identically(tmp_path):
  config = mean_teacher.get_config("smoke")
  config.train.supervised_warmup_steps = 2   # steps 1-2 supervised-only, resumed at the switch
  full = str(tmp_path / "full")
  res = loop.train_and_evaluate(config, full, progress=False)
  assert res["steps"] == 4 and 0 <= res["miou_teacher"] <= 100
  assert os.path.exists(res["figure"]) and os.path.isdir(res["tensorboard"])
  lines = [json.loads(rec) for rec in open(os.path.join(full, "metrics.jsonl"))]
  train = {rec["step"]: rec for rec in lines if "train/loss" in rec}
  assert "train/loss_unsup" not in train[2] and train[2]["train/ema_keep_rate"] == 0.0
  assert "train/loss_unsup" in train[4]
  assert any("val_teacher/miou" in rec for rec in lines)

  split = str(tmp_path / "split")
  out = loop.train_and_evaluate(config, split, progress=False, max_steps=2)
  assert out == {"stopped_at": 2}
  loop.train_and_evaluate(config, split, progress=False)

  a, step_a = _params(full)
  b, step_b = _params(split)
  assert step_a == step_b == 4
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  # `experiments.evaluate` on the workdir reproduces the run's final teacher/student mIoU.
  scores = evaluation.evaluate_workdir(full, step="latest", verbose=False)
  np.testing.assert_allclose(scores["teacher"]["miou"], res["miou_teacher"], rtol=1e-6)
  np.testing.assert_allclose(scores["student"]["miou"], res["miou_student"], rtol=1e-6)

  # `experiments.predict` writes a label PNG and an overlay per image, whole or sliding.
  images = tmp_path / "images"
  images.mkdir()
  rng = np.random.default_rng(0)
  image_io.write_image(str(images / "small.png"), rng.integers(0, 255, (20, 30, 3), np.uint8))
  image_io.write_image(str(images / "large.jpg"), rng.integers(0, 255, (70, 90, 3), np.uint8))
  out = evaluation.predict_folder(full, str(images), str(tmp_path / "preds"), step="latest")
  assert out["images"] == 2 and "sliding_window" in out["mode"] and "whole" in out["mode"]
  label = image_io.read_label(str(tmp_path / "preds" / "large.png"))
  assert label.shape == (70, 90) and label.max() < 11
  assert (tmp_path / "preds" / "small_overlay.jpg").exists()


def test_checkpoint_of_another_method_is_refused(tmp_path):
  workdir = str(tmp_path / "run")
  loop.train_and_evaluate(supervised.get_config("smoke"), workdir, progress=False, max_steps=2)
  with pytest.raises(checkpoint.CheckpointMismatchError, match="method"):
    loop.train_and_evaluate(mean_teacher.get_config("smoke"), workdir, progress=False)
