"""The ablation report reads finished runs, compares each variant with its group's reference and
writes the README block; no training (every run directory already holds its results.json)."""

import json

import pytest
from absl import flags
from absl.testing import flagsaver

from experiments.benchmarks import ablations


def _result(workdir, miou, per_class):
  workdir.mkdir(parents=True)
  (workdir / "results.json").write_text(json.dumps(dict(
      miou_teacher=miou, miou_student=miou - 1, per_class_iou_teacher=per_class,
      train_seconds=60.0)))


def test_hardest_classes_skip_background():
  assert ablations.hardest_classes([1.0, 50.0, 10.0, 30.0, 90.0], 2) == [2, 3]


def test_report_from_finished_runs(tmp_path):
  grid, ablate, readme = tmp_path / "grid", tmp_path / "ablate", tmp_path / "README.md"
  iou = lambda low: [95.0, 80.0, low, 70.0, 60.0] + [90.0] * 6
  _result(grid / "dgcl_1_16_seed0", 50.0, iou(40.0))
  _result(grid / "dssn_1_16_seed0", 52.0, iou(30.0))
  _result(ablate / "dgcl_nocontra_1_16_seed0", 47.5, iou(35.0))
  _result(ablate / "dssn_conf092_1_16_seed0", 53.0, iou(20.0))
  readme.write_text("intro\n<!-- ablations:begin -->\nold\n<!-- ablations:end -->\nrest\n")
  out = tmp_path / "ablations.json"
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["ablations"])
  with flagsaver.flagsaver(names=["dgcl_nocontra", "dssn_conf092"], grid_dir=str(grid),
                           ablation_dir=str(ablate), out=str(out), readme=str(readme)):
    ablations.main([])
  result = json.loads(out.read_text())
  # Hardest foreground classes of the DSSN reference: IoU 30 (class 2), 60 (4), 70 (3).
  assert result["hardest_classes"] == [2, 4, 3]
  names = [(r["group"], r["name"]) for r in result["rows"]]
  assert names == [("dgcl", "reference"), ("dgcl", "dgcl_nocontra"),
                   ("dssn_threshold", "reference"), ("dssn_threshold", "dssn_conf092")]
  text = readme.read_text()
  assert text.startswith("intro\n<!-- ablations:begin -->\n| group |") and text.endswith("rest\n")
  assert ("| dgcl | dgcl_nocontra | `dgcl_contrast.weight=0.0` | 47.5 | -2.5 | 35.0 | 60.0 | 70.0 |"
          in text)
  assert "| dssn_threshold | dssn_conf092 |" in text and "| 53.0 | +1.0 | 20.0 |" in text


def test_unknown_variant_is_named():
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["ablations"])
  with flagsaver.flagsaver(names=["dgcl_nocontra", "typo"]):
    with pytest.raises(Exception, match="typo"):
      ablations.main([])
