"""PASCAL VOC: palette, records from the real layout, mask policy, errors, SBD converter."""

import os

import numpy as np
import pytest
import scipy.io

from semijax.data import image_io, sources, voc
from semijax.data.sources import DataError

from . import fixtures


@pytest.fixture
def voc_data(tmp_path):
  return fixtures.make_voc(str(tmp_path))


def test_classes_and_palette():
  assert voc.NUM_CLASSES == 21 and voc.CLASS_NAMES[15] == "person"
  palette = voc.voc_palette()
  expected = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 4: (0, 0, 128),
              7: (128, 128, 128), 8: (64, 0, 0), 15: (192, 128, 128), 20: (0, 64, 128),
              255: (224, 224, 192)}
  for index, colour in expected.items():
    assert tuple(palette[index]) == colour
  assert voc.INFO.num_classes == 21 and voc.INFO.palette.shape == (21, 3)
  assert len({tuple(c) for c in palette}) == 256


def test_records_use_fine_masks_first_then_sbd(voc_data):
  root = voc_data["root"]
  src = voc.source(root, ["2007_000032", "2008_000002"], indices=[4, 9])
  assert isinstance(src, sources.FileSource) and len(src) == 2
  fine, sbd = src[0], src[1]
  assert fine["image"].dtype == np.uint8 and fine["image"].shape == fixtures.SIZE + (3,)
  assert fine["label"].dtype == np.uint8 and fine["label"].shape == fixtures.SIZE
  np.testing.assert_array_equal(fine["label"], voc_data["fine"]["2007_000032"])  # palette PNG
  np.testing.assert_array_equal(sbd["label"], voc_data["aug"]["2008_000002"])  # gray PNG
  assert fine["index"] == 4 and sbd["index"] == 9 and sbd["index"].dtype == np.int64
  assert np.abs(fine["image"].astype(int) - voc_data["images"]["2007_000032"]).mean() < 8
  # 'aug' forces SBD masks everywhere
  aug = voc.source(root, ["2007_000032"], label_dir="aug")[0]
  np.testing.assert_array_equal(aug["label"], voc_data["aug"]["2007_000032"])
  with pytest.raises(DataError, match=r"2008_000002\.png"):
    voc.source(root, ["2008_000002"], label_dir="fine")


def test_unlabeled_records_are_all_ignore_and_need_no_mask(voc_data):
  root = voc_data["root"]
  os.remove(os.path.join(root, "SegmentationClassAug", "2008_000003.png"))
  record = voc.source(root, ["2008_000003"], labeled=False)[0]
  assert record["label"].shape == fixtures.SIZE and np.all(record["label"] == 255)


def test_load_registered_split(voc_data):
  labeled, unlabeled, spec = voc.load(voc_data["root"], "classic", "92",
                                      splits_dir=voc_data["splits_dir"])
  assert spec.labeled_ids == ("2007_000039",) and len(unlabeled) == 5
  assert labeled[0]["index"] == 1  # position in train_aug
  assert sorted(int(unlabeled[i]["index"]) for i in range(len(unlabeled))) == [0, 2, 3, 4, 5]
  np.testing.assert_array_equal(labeled[0]["label"], voc_data["fine"]["2007_000039"])
  labeled, _, _ = voc.load(voc_data["root"], "blended_cps", "1/2",
                           splits_dir=voc_data["splits_dir"])
  assert labeled.ids == ("2007_000032", "2008_000002", "2009_000001")
  np.testing.assert_array_equal(labeled[2]["label"], voc_data["aug"]["2009_000001"])
  val = voc.val(voc_data["root"], splits_dir=voc_data["splits_dir"])
  assert val.ids == fixtures.VOC_VAL
  np.testing.assert_array_equal(val[1]["label"], voc_data["fine"]["2007_000042"])


def test_missing_files_are_named_with_the_fix(voc_data, tmp_path):
  root = voc_data["root"]
  os.remove(os.path.join(root, "SegmentationClassAug", "2009_000001.png"))
  with pytest.raises(DataError, match=r"2009_000001\.png.*--fix --sbd"):
    voc.source(root, ["2009_000001"])
  with pytest.raises(DataError, match="VOC2012 folder"):
    voc.source(str(tmp_path / "nothing"), ["2009_000001"])


def test_bad_label_values_corrupt_files_and_size_mismatch_name_the_file(voc_data):
  root = voc_data["root"]
  bad = voc_data["fine"]["2007_000032"].copy()
  bad[3, 3] = 21
  image_io.write_label(os.path.join(root, "SegmentationClass", "2007_000032.png"), bad,
                       voc.voc_palette())
  src = voc.source(root, ["2007_000032", "2007_000039", "2008_000008"])
  with pytest.raises(DataError, match=r"2007_000032\.png: label values \[21\] outside the class "
                     r"ids 0\.\.20 and the ignore value 255"):
    src[0]
  fixtures.corrupt(os.path.join(root, "JPEGImages", "2007_000039.jpg"), keep=200)
  with pytest.raises(DataError, match=r"2007_000039\.jpg: cannot decode"):
    src[1]
  image_io.write_label(os.path.join(root, "SegmentationClass", "2008_000008.png"),
                       np.zeros((5, 5), np.uint8), voc.voc_palette())
  with pytest.raises(DataError, match=r"2008_000008\.png: label size 5x5.*2008_000008\.jpg"):
    src[2]


def test_sbd_converter_matches_the_mat_files(voc_data, tmp_path):
  out = tmp_path / "aug_out"
  written = voc.convert_sbd(os.path.dirname(voc_data["sbd"]), str(out))  # benchmark_RELEASE
  assert written == len(fixtures.VOC_TRAIN)
  for image_id in fixtures.VOC_TRAIN:
    np.testing.assert_array_equal(image_io.read_label(out / f"{image_id}.png"),
                                  voc_data["aug"][image_id])
  assert voc.convert_sbd(voc_data["sbd"], str(out)) == 0  # existing files are kept
  assert voc.convert_sbd(voc_data["sbd"], str(out), ids=["2008_000002"], overwrite=True) == 1
  with pytest.raises(DataError, match="2010_000001"):
    voc.convert_sbd(voc_data["sbd"], str(out), ids=["2010_000001"])


def test_sbd_reader_errors(tmp_path):
  (tmp_path / "broken.mat").write_bytes(b"MATLAB 5.0 MAT-file, garbage")
  with pytest.raises(DataError, match=r"broken\.mat: cannot read"):
    voc.read_sbd_mat(str(tmp_path / "broken.mat"))
  scipy.io.savemat(tmp_path / "inst.mat", {"GTinst": {"Segmentation": np.zeros((2, 2))}})
  with pytest.raises(DataError, match=r"inst\.mat: no GTcls\.Segmentation"):
    voc.read_sbd_mat(str(tmp_path / "inst.mat"))
  scipy.io.savemat(tmp_path / "big.mat", {"GTcls": {"Segmentation": np.full((2, 2), 30,
                                                                            np.uint8)}})
  with pytest.raises(DataError, match=r"big\.mat.*\[30\] outside 0\.\.20"):
    voc.read_sbd_mat(str(tmp_path / "big.mat"))
  with pytest.raises(DataError, match="no SBD class masks"):
    voc.find_sbd_cls_dir(str(tmp_path / "none"))
