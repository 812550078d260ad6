"""Custom folder datasets: metadata, remapping, binary masks, splits, errors."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from semijax.data import folder, image_io
from semijax.data.sources import DataError

from . import fixtures


def _rewrite_metadata(root, metadata):
  with open(os.path.join(root, "dataset.json"), "w") as f:
    json.dump(metadata, f)


def test_binary_dataset_with_gray_images(tmp_path):
  d = fixtures.make_folder(str(tmp_path), gray_images=True)
  parts = folder.load(d["root"])  # no fraction: every masked image labeled
  assert parts.labeled.info.num_classes == 2 and parts.labeled.info.name == "custom"
  assert len(parts.labeled) == 8 and len(parts.unlabeled) == 2 and parts.val is None
  record = parts.labeled[1]
  stem = parts.labeled.ids[1]
  assert record["image"].shape == fixtures.SIZE + (3,)
  np.testing.assert_array_equal(record["image"], d["images"][stem])  # PNG, gray -> RGB
  np.testing.assert_array_equal(record["label"], d["masks"][stem])
  extra = parts.unlabeled[0]
  assert np.all(extra["label"] == 255) and extra["index"] == 8  # after the 8 masked images


def test_ignore_index_is_remapped_to_255(tmp_path):
  meta = {"class_names": ["a", "b", "c"], "ignore_index": 100, "palette": [[0, 0, 0], [1, 1, 1],
                                                                          [2, 2, 2]]}
  d = fixtures.make_folder(str(tmp_path), metadata=meta, values=(0, 1, 2, 100))
  parts = folder.load(d["root"])
  record = parts.labeled[0]
  raw = d["masks"][parts.labeled.ids[0]]
  np.testing.assert_array_equal(record["label"], np.where(raw == 100, 255, raw))
  np.testing.assert_array_equal(parts.labeled.info.palette, meta["palette"])


def test_zero_255_binary_masks_with_value_map(tmp_path):
  d = fixtures.make_folder(str(tmp_path), values=(0, 255),
                           metadata={"class_names": ["bg", "fg"], "value_map": {"255": 1}})
  parts = folder.load(d["root"])
  raw = d["masks"][parts.labeled.ids[0]]
  np.testing.assert_array_equal(parts.labeled[0]["label"], (raw == 255).astype(np.uint8))


def test_invalid_raw_values_name_the_file(tmp_path):
  d = fixtures.make_folder(str(tmp_path), values=(0, 1, 7))
  parts = folder.load(d["root"])
  with pytest.raises(DataError, match=r"case_000\.png: label values \[7\]"):
    parts.labeled[0]
  meta = {"class_names": ["a", "b"], "ignore_index": 9}
  d = fixtures.make_folder(str(tmp_path), values=(0, 1, 255), metadata=meta, name="other")
  with pytest.raises(DataError, match=r"case_000\.png: label values \[255\]"):
    folder.load(d["root"]).labeled[0]  # 255 is not the ignore value here


def test_rgb_masks(tmp_path):
  palette = [[0, 0, 0], [255, 0, 0], [0, 255, 0]]
  d = fixtures.make_folder(str(tmp_path), values=(0, 1, 2), metadata={
      "class_names": ["bg", "red", "green"], "palette": palette, "mask_format": "rgb"})
  for stem, mask in d["masks"].items():
    Image.fromarray(np.asarray(palette, np.uint8)[mask]).save(
        os.path.join(d["root"], "masks", stem + ".png"))
  parts = folder.load(d["root"])
  np.testing.assert_array_equal(parts.labeled[2]["label"], d["masks"][parts.labeled.ids[2]])


def test_fraction_split_is_seeded_and_nested_and_val_is_fixed(tmp_path):
  d = fixtures.make_folder(str(tmp_path), num_images=32, num_unlabeled=3)
  eighth = folder.load(d["root"], fraction=1 / 8, seed=1, val_fraction=0.25)
  quarter = folder.load(d["root"], fraction=1 / 4, seed=1, val_fraction=0.25)
  other_seed = folder.load(d["root"], fraction=1 / 8, seed=2, val_fraction=0.25)
  assert len(eighth.val) == 8 and len(eighth.labeled) == 3 and len(eighth.unlabeled) == 21 + 3
  assert set(eighth.labeled.ids) <= set(quarter.labeled.ids)
  assert eighth.val.ids == other_seed.val.ids  # same val for every training seed
  assert not set(eighth.val.ids) & set(eighth.labeled.ids + eighth.unlabeled.ids)
  assert eighth.spec.protocol == "fraction" and eighth.spec.name == "0.125_seed1"
  assert folder.load(d["root"], fraction=1 / 8, seed=1, val_fraction=0.25).labeled.ids == \
      eighth.labeled.ids
  indices = [int(r["index"]) for r in (eighth.labeled[i] for i in range(len(eighth.labeled)))]
  assert indices == [eighth.labeled.items[i].index for i in range(3)]


def test_explicit_splits(tmp_path):
  meta = {"class_names": ["bg", "fg"], "splits": {"labeled": ["case_001", "case_004"],
                                                   "val": ["case_007"]}}
  d = fixtures.make_folder(str(tmp_path), metadata=meta)
  parts = folder.load(d["root"])
  assert parts.labeled.ids == ("case_001", "case_004") and parts.val.ids == ("case_007",)
  assert len(parts.unlabeled) == 8 - 3 + 2 and parts.spec.protocol == "explicit"
  with pytest.raises(DataError, match="lists splits.labeled.*split=explicit"):
    folder.load(d["root"], fraction=0.5)
  meta["splits"]["unlabeled"] = ["case_001"]
  _rewrite_metadata(d["root"], meta)
  with pytest.raises(DataError, match="'case_001' is in splits.labeled and splits.unlabeled"):
    folder.load(d["root"])
  meta["splits"] = {"labeled": ["case_999"]}
  _rewrite_metadata(d["root"], meta)
  with pytest.raises(DataError, match="case_999"):
    folder.load(d["root"])


def test_layout_and_metadata_errors(tmp_path):
  d = fixtures.make_folder(str(tmp_path))
  root = d["root"]
  os.remove(os.path.join(root, "masks", "case_003.png"))
  with pytest.raises(DataError, match=r"1 images in images/ have no masks/NAME\.png: case_003"):
    folder.FolderDataset(root)
  image_io.write_label(os.path.join(root, "masks", "case_003.png"), d["masks"]["case_003"])
  image_io.write_label(os.path.join(root, "masks", "ghost.png"), d["masks"]["case_003"])
  with pytest.raises(DataError, match="1 masks have no image in images/: ghost"):
    folder.FolderDataset(root)
  os.remove(os.path.join(root, "masks", "ghost.png"))
  for bad, message in [({"class_names": ["only"]}, "at least 2"),
                       ({"class_names": ["a", "b"], "ignore_index": 1}, "also a class id"),
                       ({"class_names": ["a", "b"], "colour": 1}, "unknown keys"),
                       ({"class_names": ["a", "b"], "palette": [[0, 0, 0]]}, "palette must be"),
                       ({"class_names": ["a", "b"], "mask_format": "rgb"}, "needs the palette"),
                       ({"class_names": ["a", "b"], "value_map": {"9": 5}}, "value_map")]:
    _rewrite_metadata(root, bad)
    with pytest.raises(DataError, match=message):
      folder.FolderDataset(root)
  os.remove(os.path.join(root, "dataset.json"))
  with pytest.raises(DataError, match=r"dataset\.json: not found.*class_names"):
    folder.FolderDataset(root)
