"""`experiments/prepare_data.py`, run in-process on good and broken fixture folders."""

import io
import os
import re

import numpy as np

from experiments import prepare_data
from semijax.data import cityscapes, image_io, sources, voc

from . import fixtures


def run(*argv):
  stream = io.StringIO()
  status = prepare_data.main([str(a) for a in argv], stream=stream)
  return status, stream.getvalue()


def test_voc_good_folder_passes(tmp_path):
  d = fixtures.make_voc(str(tmp_path))
  status, out = run("voc", "--root", d["root"], "--splits-dir", d["splits_dir"])
  assert status == 0, out
  assert "classic/92: 1 labeled, 5 unlabeled: ok" in out
  assert "blended_u2pl/1_16: not in" in out  # lists absent from the custom folder are skipped
  assert "label values (pixel share): 0 background" in out and "255 ignore" in out
  assert "no problems found" in out


def test_voc_broken_folder_names_every_problem(tmp_path):
  d = fixtures.make_voc(str(tmp_path))
  root = d["root"]
  os.remove(os.path.join(root, "SegmentationClassAug", "2009_000001.png"))
  fixtures.corrupt(os.path.join(root, "JPEGImages", "2008_000002.jpg"), keep=100)
  bad = d["fine"]["2007_000032"].copy()
  bad[2, 2] = 40
  image_io.write_label(os.path.join(root, "SegmentationClass", "2007_000032.png"), bad,
                       voc.voc_palette())
  image_io.write_label(os.path.join(root, "SegmentationClass", "2007_000033.png"),
                       np.zeros((4, 4), np.uint8), voc.voc_palette())
  status, out = run("voc", "--root", root, "--splits-dir", d["splits_dir"], "--full")
  assert status == 1
  assert "1 train images have no mask" in out and "2009_000001.png" in out
  assert "--fix --sbd" in out  # what to run
  assert "2008_000002.jpg: cannot decode" in out
  assert re.search(r"value 40 in 1 file: \S*2007_000032\.png", out), out
  assert "valid: the class ids (0 background, 1 aeroplane," in out
  assert "2007_000033.png: label size 4x4" in out
  assert "classic/1464: 3 labeled, 3 unlabeled: ok" in out  # 2009_000001 is unlabeled there
  assert "blended_cps/1_2: 3 labeled, 3 unlabeled: 1 files missing" in out


def test_voc_fix_converts_missing_sbd_masks(tmp_path):
  d = fixtures.make_voc(str(tmp_path))
  for image_id in fixtures.VOC_SBD_TRAIN:
    os.remove(os.path.join(d["root"], "SegmentationClassAug", image_id + ".png"))
  status, out = run("voc", "--root", d["root"], "--splits-dir", d["splits_dir"])
  assert status == 1 and "3 train images have no mask" in out
  status, out = run("voc", "--root", d["root"], "--splits-dir", d["splits_dir"], "--fix", "--sbd",
                    os.path.dirname(d["sbd"]))
  assert status == 0, out
  assert "wrote 3 PNGs" in out
  np.testing.assert_array_equal(
      image_io.read_label(os.path.join(d["root"], "SegmentationClassAug", "2009_000001.png")),
      d["aug"]["2009_000001"])


def test_cityscapes_missing_train_ids_then_fix(tmp_path):
  d = fixtures.make_cityscapes(str(tmp_path), train_ids=False)
  status, out = run("cityscapes", "--root", d["root"], "--splits-dir", d["splits_dir"])
  assert status == 1
  assert "4 train *_gtFine_labelTrainIds.png missing" in out
  assert "prepare_data cityscapes --root" in out and "--fix" in out
  status, out = run("cityscapes", "--root", d["root"], "--splits-dir", d["splits_dir"], "--fix")
  assert status == 0, out
  assert "wrote 6 files" in out and "cps/1_2: 2 labeled, 2 unlabeled: ok" in out
  assert os.path.isfile(cityscapes.label_path(d["root"], "val", fixtures.CITY_VAL[0]))


def test_cityscapes_missing_image_is_named(tmp_path):
  d = fixtures.make_cityscapes(str(tmp_path))
  gone = cityscapes.image_path(d["root"], "train", fixtures.CITY_TRAIN[1])
  os.remove(gone)
  status, out = run("cityscapes", "--root", d["root"], "--splits-dir", d["splits_dir"])
  assert status == 1 and "1 train images missing: " + gone in out


def test_folder_checks(tmp_path):
  d = fixtures.make_folder(str(tmp_path), num_images=6)
  status, out = run("folder", "--root", d["root"], "--fraction", "0.5", "--sample", "2")
  assert status == 0, out
  assert "3 labeled, 5 unlabeled, 0 val" in out and "decoding 2 of 6 records" in out
  d = fixtures.make_folder(str(tmp_path), values=(0, 255), name="binary255")
  status, out = run("folder", "--root", d["root"])
  assert status == 1 and '"value_map": {"255": 1}' in out
  os.remove(os.path.join(d["root"], "dataset.json"))
  status, out = run("folder", "--root", d["root"])
  assert status == 1 and "dataset.json: not found" in out
  status, out = run("folder", "--root", tmp_path / "missing")
  assert status == 1 and "folder not found" in out


def test_pack_to_array_record_and_read_back(tmp_path):
  d = fixtures.make_folder(str(tmp_path), num_images=4, num_unlabeled=2)
  out_dir = tmp_path / "packed"
  status, out = run("folder", "--root", d["root"], "--to-array-record", out_dir)
  assert status == 0, out
  assert "packed train (4), unlabeled (2)" in out
  train = sources.PackedSource(str(out_dir), "train", ids=["case_002", "case_000"])
  assert len(train) == 2 and train.info.class_names == ("background", "foreground")
  record = train[0]
  np.testing.assert_array_equal(record["label"], d["masks"]["case_002"])
  assert record["index"] == 2 and record["image"].shape == fixtures.SIZE + (3,)
  extra = sources.PackedSource(str(out_dir), "unlabeled", labeled=False)
  assert len(extra) == 2 and np.all(extra[1]["label"] == 255) and extra[1]["index"] == 5


def test_partial_folder_against_the_shipped_lists_names_a_few_and_counts(tmp_path):
  d = fixtures.make_voc(str(tmp_path))  # 8 images, not the 12031 the shipped lists need
  status, out = run("voc", "--root", d["root"], "--max-listed", "3")
  assert status == 1
  line = next(ln for ln in out.splitlines() if "train images missing" in ln)
  # the fixture's 6 train images are real train_aug ids
  assert line.startswith("!! 10576 train images missing: ") and "... and 10573 more" in line
  assert "classic/732: 732 labeled, 9850 unlabeled: " in out
