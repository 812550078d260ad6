"""`FileSource` and `PackedSource`: the record interface, pickling for grain workers, errors."""

import os
import pickle

import grain
import numpy as np
import pytest

from semijax.data import cityscapes, sources, voc
from semijax.data.sources import DataError, FileItem, FileSource

from . import fixtures


def _assert_record(record, size=fixtures.SIZE):
  assert set(record) == {"image", "label", "index"}
  assert record["image"].dtype == np.uint8 and record["image"].shape == size + (3,)
  assert record["label"].dtype == np.uint8 and record["label"].shape == size
  assert isinstance(record["index"], np.int64)


def test_same_record_structure_as_array_source(tmp_path):
  d = fixtures.make_voc(str(tmp_path))
  file_record = voc.source(d["root"], ["2007_000032"])[0]
  array_record = sources.ArraySource(file_record["image"][None], file_record["label"][None],
                                     voc.INFO)[0]
  _assert_record(file_record)
  for key in file_record:
    assert type(file_record[key]) is type(array_record[key])
    np.testing.assert_array_equal(file_record[key], array_record[key])


def test_file_source_checks_files_and_labels_at_construction(tmp_path):
  info = voc.INFO
  with pytest.raises(DataError, match=r"2 files not found: .*a\.jpg, .*a\.png"):
    FileSource([FileItem("a", str(tmp_path / "a.jpg"), str(tmp_path / "a.png"))], info)
  with pytest.raises(DataError, match="1 labeled examples have no label file: a"):
    FileSource([FileItem("a", str(tmp_path / "a.jpg"))], info, check_files=False)
  with pytest.raises(DataError, match="lookup table"):
    FileSource([], info, lut=np.zeros(10))


def test_sources_pickle_and_feed_grain(tmp_path):
  d = fixtures.make_cityscapes(str(tmp_path))
  src = cityscapes.source(d["root"], fixtures.CITY_TRAIN, label_format="labelIds")
  clone = pickle.loads(pickle.dumps(src))  # grain workers receive pickled sources
  np.testing.assert_array_equal(clone[1]["label"], src[1]["label"])
  dataset = grain.MapDataset.source(src).shuffle(seed=0)
  records = [dataset[i] for i in range(len(src))]
  assert sorted(int(r["index"]) for r in records) == [0, 1, 2, 3]
  for record in records:
    _assert_record(record)


def test_packed_voc_round_trip_and_subsets(tmp_path):
  d = fixtures.make_voc(str(tmp_path))
  train = voc.source(d["root"], fixtures.VOC_TRAIN, indices=range(10, 16))
  val = voc.val(d["root"], splits_dir=d["splits_dir"])
  directory = sources.pack_sources({"train": train, "val": val}, str(tmp_path / "packed"))
  assert os.path.isfile(os.path.join(directory, "dataset_info.json"))
  packed = sources.PackedSource(directory, "train", ids=["2009_000001", "2007_000032"])
  assert packed.ids == ("2009_000001", "2007_000032") and packed.info.num_classes == 21
  for i, j in ((0, 5), (1, 0)):
    got, want = packed[i], train[j]
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  np.testing.assert_array_equal(sources.PackedSource(directory, "val")[1]["label"],
                                d["fine"]["2007_000042"])
  unlabeled = pickle.loads(pickle.dumps(
      sources.PackedSource(str(tmp_path / "packed"), "train", labeled=False)))
  assert len(unlabeled) == 6 and np.all(unlabeled[3]["label"] == 255)
  with pytest.raises(DataError, match=r"1 ids not in packed split 'train': 2012_000001"):
    sources.PackedSource(directory, "train", ids=["2012_000001"])
  with pytest.raises(DataError, match=r"no split 'test'; packed splits: \['train', 'val'\]"):
    sources.PackedSource(directory, "test")
  with pytest.raises(DataError, match="not a packed semijax dataset"):
    sources.PackedSource(str(tmp_path), "train")


def test_packing_stops_at_a_bad_file(tmp_path):
  d = fixtures.make_voc(str(tmp_path))
  fixtures.corrupt(os.path.join(d["root"], "JPEGImages", "2008_000003.jpg"), keep=100)
  src = voc.source(d["root"], fixtures.VOC_TRAIN)
  with pytest.raises(DataError, match=r"2008_000003\.jpg: cannot decode"):
    sources.pack_sources({"train": src}, str(tmp_path / "packed"))
