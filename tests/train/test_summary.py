"""The end-of-run summary (`semijax.train.summary.format_run_summary`)."""

import json
import os

from semijax.train import summary

RESULTS = {"method": "mean_teacher", "dataset": "folder", "split": "1/8", "split_seed": 0,
           "seed": 1, "steps": 1200, "eval_mode": "whole", "miou_teacher": 81.234,
           "miou_student": 80.71, "per_class_iou_teacher": [83.0, None, 80.55],
           "train_seconds": 204.0, "skipped_steps": 0}


def _workdir(tmp_path, metrics=(), steps=()):
  workdir = tmp_path / "runs" / "tex"
  os.makedirs(workdir / "checkpoints")
  for s in steps:
    os.makedirs(workdir / "checkpoints" / str(s))
  os.makedirs(workdir / "checkpoints" / "1300.orbax-checkpoint-tmp")   # unfinished: not listed
  with open(workdir / "metrics.jsonl", "w") as f:
    for line in metrics:
      f.write(json.dumps(line) + "\n")
    f.write('{"step": 13')    # a half-written line of a killed run
  return str(workdir)


def test_summary_names_results_best_step_and_every_location(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  workdir = _workdir(tmp_path, metrics=[{"step": 400, "val_teacher/miou": 70.0},
                                        {"step": 800, "val_teacher/miou": 81.9},
                                        {"step": 800, "train/loss": 0.3},
                                        {"step": 1200, "val_teacher/miou": 81.2}],
                     steps=(800, 1200))
  results = dict(RESULTS, class_names=["stripes", "checks", "speckles"],
                 figure=os.path.join(workdir, "predictions.png"),
                 tensorboard=os.path.join(workdir, "tensorboard"))
  lines = summary.format_run_summary(results, workdir).split("\n")
  assert all(line.startswith("[semijax] ") for line in lines)
  text = "\n".join(lines)
  assert ("done: mean_teacher on folder, split 1/8 (split seed 0, seed 1), 1200 steps in 3.4 min"
          in text)
  assert "val mIoU (whole): teacher 81.2, student 80.7; best teacher 81.9 at step 800" in text
  assert "per-class IoU (teacher): stripes 83.0, checks -, speckles 80.5" in text
  assert "results:     runs/tex/results.json" in text
  assert "figure:      runs/tex/predictions.png" in text
  assert "checkpoints: runs/tex/checkpoints (steps 800, 1200; --step=best picks 800)" in text
  assert "logs:        runs/tex/metrics.jsonl; tensorboard --logdir runs/tex/tensorboard" in text
  assert "python -m experiments.evaluate --workdir=runs/tex" in text
  assert "WARNING" not in text


def test_summary_prefers_the_results_best_step_and_tolerates_missing_keys(tmp_path):
  workdir = _workdir(tmp_path)
  text = summary.format_run_summary(
      {"miou_teacher": 50.0, "best_step": 300, "best_val_miou": 52.04, "skipped_steps": 2},
      workdir)
  assert "done: ? on ?, split ? (split seed ?, seed ?), ? steps in ?" in text
  assert "teacher 50.0, student ?; best teacher 52.0 at step 300" in text
  assert "WARNING: 2 update(s) were skipped" in text
  assert "checkpoints:" not in text    # none finished
  assert summary.best_from_metrics(os.path.join(workdir, "metrics.jsonl")) is None
