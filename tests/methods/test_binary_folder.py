"""Every semi-supervised method trains end to end on a binary custom folder dataset."""

import importlib
import json
import os

import numpy as np
import pytest

from semijax.train import loop
from tests.data import fixtures


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mean_teacher", "dgcl", "dssn"])
def test_method_trains_on_a_binary_folder_dataset(name, tmp_path):
  data = fixtures.make_folder(str(tmp_path / "data"), num_images=8, num_unlabeled=2)
  c = importlib.import_module(f"experiments.configs.{name}").get_config("smoke,split=1/2")
  c.data.dataset, c.data.root, c.data.val_fraction = "folder", data["root"], 0.25
  c.data.crop_size = 16
  c.train.num_devices = 1
  c.train.total_steps, c.train.eval_every, c.train.checkpoint_every = 3, 0, 0
  c.train.supervised_warmup_steps = 0
  if name == "dgcl":   # 2 classes, background excluded: class 1 is the only anchor class
    t = c.dgcl_contrast
    t.bank_size, t.push_per_class, t.min_bank_size = 16, 16, 8
    t.wait_for_full_bank = False
  res = loop.train_and_evaluate(c, str(tmp_path / "run"), progress=False)
  assert res["steps"] == 3 and len(res["per_class_iou_teacher"]) == 2
  assert 0 <= res["miou_teacher"] <= 100
  lines = [json.loads(rec) for rec in open(os.path.join(tmp_path / "run", "metrics.jsonl"))]
  train = [rec for rec in lines if "train/loss" in rec]
  assert train and all(np.isfinite(v) for rec in train for v in rec.values())
