"""Results figures on small synthetic inputs (`experiments/benchmarks/figures.py`)."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from experiments.benchmarks import figures

pytest.importorskip("matplotlib")


def _results(path, rows):
  with open(path, "w") as f:
    json.dump({"rows": rows, "table": ""}, f)
  return str(path)


def _run(root, name, method, split, seed, steps=(100, 200, 300)):
  path = os.path.join(root, name)
  os.makedirs(path)
  with open(os.path.join(path, "results.json"), "w") as f:
    json.dump({"method": method, "split": split, "seed": seed}, f)
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    for i, s in enumerate(steps):
      f.write(json.dumps({"step": s, "train/loss": 2.0 / (i + 1), "train/loss_sup": 1.0}) + "\n")
      f.write(json.dumps({"step": s, "val_teacher/miou": 40.0 + 5 * i}) + "\n")
      f.write(json.dumps({"step": s, "val_student/miou": 39.0 + 5 * i}) + "\n")
    f.write("{not json")
  return path


ROWS = [{"method": m, "split": s, "seed": seed, "miou_teacher": base + 10 * (s == "1/8") + seed}
        for m, base in (("supervised", 50.0), ("dgcl", 48.0)) for s in ("1/16", "1/8")
        for seed in (0, 1, 2)]


def test_label_fraction_series_mean_std_and_points():
  series = figures.label_fraction_series(ROWS)
  assert list(series) == ["supervised", "dgcl"]
  s = series["supervised"]
  np.testing.assert_allclose(s["x"], [1 / 16, 1 / 8])
  np.testing.assert_allclose(s["mean"], [51.0, 61.0])
  np.testing.assert_allclose(s["std"], [1.0, 1.0])   # sample std of 50, 51, 52
  assert s["n"] == [3, 3] and len(s["points"]) == 6
  one = figures.label_fraction_series([dict(ROWS[0])])
  assert one["supervised"]["std"][0] == 0.0


def test_plot_label_fraction_writes_a_png(tmp_path):
  out = figures.plot_label_fraction(_results(tmp_path / "r.json", ROWS),
                                    str(tmp_path / "figs" / "lf.png"))
  image = np.asarray(Image.open(out))
  assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 500
  assert len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 20   # something drawn
  with open(tmp_path / "bad.json", "w") as f:
    json.dump({"rows": [{"method": "x"}]}, f)
  with pytest.raises(ValueError, match=r"bad\.json: row 0 lacks \['miou_teacher', 'split'\]"):
    figures.plot_label_fraction(str(tmp_path / "bad.json"), str(tmp_path / "x.png"))


def test_training_curves_and_run_discovery(tmp_path):
  runs = tmp_path / "runs"
  _run(runs, "dgcl_1_8_seed0", "dgcl", "1/8", 0)
  _run(runs, "dgcl_1_16_seed1", "dgcl", "1/16", 1)
  want = _run(runs, "dgcl_1_16_seed0", "dgcl", "1/16", 0)
  sup = _run(runs, "supervised_1_16_seed0", "supervised", "1/16", 0)
  os.makedirs(runs / "empty")
  found = figures.find_runs(str(runs))
  assert found == {"dgcl": want, "supervised": sup}   # seed 0, smallest fraction
  assert list(found) == ["supervised", "dgcl"]        # the README's method order
  assert figures.method_colours(["dgcl", "mine", "supervised"]) == {
      "supervised": "C0", "dgcl": "C2", "mine": "C4"}  # one colour per method in every figure
  assert figures.find_runs(str(runs), split="1/8")["dgcl"].endswith("dgcl_1_8_seed0")
  metrics = figures.read_metrics(os.path.join(want, "metrics.jsonl"))
  assert metrics["val_teacher/miou"] == [(100, 40.0), (200, 45.0), (300, 50.0)]
  out = figures.plot_training_curves(found, str(tmp_path / "curves.png"))
  assert Image.open(out).size[0] > 800
  with pytest.raises(ValueError, match="empty: no metrics.jsonl"):
    figures.plot_training_curves({"x": str(runs / "empty")}, str(tmp_path / "y.png"))


def test_cli_writes_both_figures(tmp_path, capsys):
  _run(tmp_path / "runs", "a", "supervised", "1/16", 0)
  results = _results(tmp_path / "r.json", ROWS)
  assert figures.main([f"--results={results}", f"--runs={tmp_path / 'runs'}",
                       f"--out={tmp_path / 'out'}"]) == 0
  assert sorted(os.listdir(tmp_path / "out")) == ["label_fraction.png", "training_curves.png"]
  assert "training curves: supervised <-" in capsys.readouterr().out
