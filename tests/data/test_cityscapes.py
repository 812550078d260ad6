"""Cityscapes: the official labelId -> trainId table, converter, records, splits, errors."""

import os

import numpy as np
import pytest

from semijax.data import cityscapes, image_io
from semijax.data.sources import DataError

from . import fixtures

# (labelId, trainId) of every label in cityscapesScripts `helpers/labels.py`, written out row by
# row from that table (name in the comment); 255 and -1 both mean "not trained on".
OFFICIAL = [
    (0, 255),   # unlabeled
    (1, 255),   # ego vehicle
    (2, 255),   # rectification border
    (3, 255),   # out of roi
    (4, 255),   # static
    (5, 255),   # dynamic
    (6, 255),   # ground
    (7, 0),     # road
    (8, 1),     # sidewalk
    (9, 255),   # parking
    (10, 255),  # rail track
    (11, 2),    # building
    (12, 3),    # wall
    (13, 4),    # fence
    (14, 255),  # guard rail
    (15, 255),  # bridge
    (16, 255),  # tunnel
    (17, 5),    # pole
    (18, 255),  # polegroup
    (19, 6),    # traffic light
    (20, 7),    # traffic sign
    (21, 8),    # vegetation
    (22, 9),    # terrain
    (23, 10),   # sky
    (24, 11),   # person
    (25, 12),   # rider
    (26, 13),   # car
    (27, 14),   # truck
    (28, 15),   # bus
    (29, 255),  # caravan
    (30, 255),  # trailer
    (31, 16),   # train
    (32, 17),   # motorcycle
    (33, 18),   # bicycle
]


def test_train_id_table_matches_the_official_one_on_all_34_ids():
  assert len(OFFICIAL) == 34
  ids = np.array([i for i, _ in OFFICIAL], np.uint8)
  np.testing.assert_array_equal(cityscapes.label_ids_to_train_ids(ids),
                                [t for _, t in OFFICIAL])
  # values no official label uses (e.g. 34..254, or 255) are ignored too
  np.testing.assert_array_equal(cityscapes.label_ids_to_train_ids(np.array([34, 100, 255])),
                                [255, 255, 255])
  assert set(cityscapes.LABEL_ID_NAMES) == set(range(34)) | {-1}


def test_classes_and_palette():
  assert cityscapes.NUM_CLASSES == 19 and cityscapes.INFO.num_classes == 19
  assert cityscapes.CLASS_NAMES[0] == "road" and cityscapes.CLASS_NAMES[18] == "bicycle"
  assert tuple(cityscapes.PALETTE[0]) == (128, 64, 128)
  assert tuple(cityscapes.PALETTE[13]) == (0, 0, 142)
  for train_id, label_id in enumerate(cityscapes.EVAL_LABEL_IDS):
    assert cityscapes.LABEL_ID_NAMES[label_id] == cityscapes.CLASS_NAMES[train_id]


def test_converter_writes_train_ids(tmp_path):
  d = fixtures.make_cityscapes(str(tmp_path), train_ids=False)
  written = cityscapes.convert_label_ids(d["root"])
  assert written == len(fixtures.CITY_TRAIN) + len(fixtures.CITY_VAL)
  for split, ids in (("train", fixtures.CITY_TRAIN), ("val", fixtures.CITY_VAL)):
    for image_id in ids:
      out = image_io.read_label(cityscapes.label_path(d["root"], split, image_id))
      expected = np.array([dict(OFFICIAL)[v] for v in d["label_ids"][image_id].ravel()])
      np.testing.assert_array_equal(out.ravel(), expected)
  assert cityscapes.convert_label_ids(d["root"]) == 0
  with pytest.raises(DataError, match="no gtFine"):
    cityscapes.convert_label_ids(str(tmp_path / "empty"))


def test_records_from_train_ids_and_label_ids_agree(tmp_path):
  d = fixtures.make_cityscapes(str(tmp_path))
  ids = [fixtures.CITY_TRAIN[2], fixtures.CITY_VAL[0]]
  from_train_ids = cityscapes.source(d["root"], ids)
  from_label_ids = cityscapes.source(d["root"], ids, label_format="labelIds")
  for i in range(2):
    a, b = from_train_ids[i], from_label_ids[i]
    np.testing.assert_array_equal(a["label"], b["label"])
    np.testing.assert_array_equal(a["image"], d["images"][ids[i]])  # PNG: exact
    assert a["label"].max() == 255 and set(np.unique(a["label"])) <= set(range(19)) | {255}
  unlabeled = cityscapes.source(d["root"], ids, labeled=False)
  assert np.all(unlabeled[0]["label"] == 255)


def test_load_maps_cps_lines_to_the_official_layout(tmp_path):
  d = fixtures.make_cityscapes(str(tmp_path))
  labeled, unlabeled, spec = cityscapes.load(d["root"], "cps", "1_2",
                                             splits_dir=d["splits_dir"])
  assert spec.labeled_ids == fixtures.CITY_TRAIN[:2]
  assert labeled.items[0].image.endswith(
      os.path.join("leftImg8bit", "train", "aachen", "aachen_000000_000019_leftImg8bit.png"))
  assert labeled.items[0].label.endswith(
      os.path.join("gtFine", "train", "aachen", "aachen_000000_000019_gtFine_labelTrainIds.png"))
  assert [int(unlabeled[i]["index"]) for i in range(2)] == [2, 3]
  val = cityscapes.val(d["root"], splits_dir=d["splits_dir"])
  assert val.ids == fixtures.CITY_VAL
  assert os.sep + "val" + os.sep in val.items[0].image


def test_missing_train_ids_explain_the_fix(tmp_path):
  d = fixtures.make_cityscapes(str(tmp_path), train_ids=False)
  with pytest.raises(DataError, match=r"labelTrainIds\.png.*--fix.*label_format='labelIds'"):
    cityscapes.source(d["root"], fixtures.CITY_TRAIN)
  assert len(cityscapes.source(d["root"], fixtures.CITY_TRAIN, label_format="labelIds")) == 4


def test_out_of_range_train_ids_name_the_file(tmp_path):
  d = fixtures.make_cityscapes(str(tmp_path))
  image_id = fixtures.CITY_TRAIN[0]
  path = cityscapes.label_path(d["root"], "train", image_id)
  image_io.write_label(path, np.full(fixtures.SIZE, 19, np.uint8))  # labelIds written by mistake
  with pytest.raises(DataError, match=rf"{image_id}_gtFine_labelTrainIds\.png: label values "):
    cityscapes.source(d["root"], [image_id])[0]


def test_scan_ids_and_split_of(tmp_path):
  d = fixtures.make_cityscapes(str(tmp_path))
  assert cityscapes.scan_ids(d["root"], "val") == tuple(sorted(fixtures.CITY_VAL))
  assert cityscapes.split_of("munster_000000_000019") == "val"
  assert cityscapes.split_of("berlin_000000_000019") == "test"
  assert cityscapes.split_of("zurich_000000_000019") == "train"
