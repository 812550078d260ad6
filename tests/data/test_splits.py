"""The split registry (shipped lists, formats, validation) and the fraction-by-seed splitter."""

import os

import numpy as np
import pytest

from semijax.data import cityscapes, splits, voc
from semijax.data.sources import DataError

from . import fixtures

REGISTERED = [(d, p, n) for d in splits.DATASETS for p, names in splits.protocols(d).items()
              for n in names]


def test_registry_matches_the_published_counts():
  assert splits.protocols("voc") == {
      "classic": ("92", "183", "366", "732", "1464"),
      "blended_cps": ("1_16", "1_8", "1_4", "1_2"),
      "blended_u2pl": ("1_16", "1_8", "1_4")}
  assert splits.protocols("cityscapes") == {"cps": ("1_16", "1_8", "1_4", "1_2"),
                                            "unimatch": ("1_30",)}
  assert len(REGISTERED) == 17


@pytest.mark.parametrize("dataset,protocol,name", REGISTERED)
def test_every_shipped_split_parses_with_the_right_counts(dataset, protocol, name):
  spec = splits.load_split(dataset, protocol, name)  # also checks disjoint + covers train
  train = splits.train_ids(dataset)
  assert spec.num_labeled == splits.LABELED_COUNTS[(dataset, protocol)][name]
  assert spec.num_labeled + spec.num_unlabeled == len(train) == splits.TRAIN_COUNTS[dataset]
  assert not set(spec.labeled_ids) & set(spec.unlabeled_ids)
  assert set(spec.labeled_ids) | set(spec.unlabeled_ids) == set(train)
  assert all(os.path.isfile(f) for f in spec.files)


def test_expected_counts_spelled_out():
  got = {(d, p, n): splits.load_split(d, p, n).num_labeled for d, p, n in REGISTERED}
  assert [got[("voc", "classic", n)] for n in ("92", "183", "366", "732", "1464")] == [
      92, 183, 366, 732, 1464]
  assert [got[("voc", "blended_cps", n)] for n in ("1_16", "1_8", "1_4", "1_2")] == [
      662, 1323, 2646, 5291]
  assert [got[("cityscapes", "cps", n)] for n in ("1_16", "1_8", "1_4", "1_2")] == [
      186, 372, 744, 1488]
  assert got[("cityscapes", "unimatch", "1_30")] == 100
  assert splits.load_split("voc", "classic", 92).num_unlabeled == 10582 - 92


def test_train_and_val_sets():
  assert len(splits.val_ids("voc")) == 1449 and len(splits.val_ids("cityscapes")) == 500
  for dataset in splits.DATASETS:
    assert not set(splits.val_ids(dataset)) & set(splits.train_ids(dataset))
  # classic labeled images all come from the 1464 fine-annotated train set, nested
  fine = set(splits.load_split("voc", "classic", "1464").labeled_ids)
  for name in ("92", "183", "366", "732"):
    assert set(splits.load_split("voc", "classic", name).labeled_ids) <= fine
  # U2PL's blended lists are different images from CPS's for the same counts
  cps = set(splits.load_split("voc", "blended_cps", "1_16").labeled_ids)
  u2pl = set(splits.load_split("voc", "blended_u2pl", "1_16").labeled_ids)
  assert len(cps) == len(u2pl) and cps != u2pl


def test_files_without_final_newline_count_entries(tmp_path):
  path = tmp_path / "a.txt"
  path.write_text("2007_000032\n\n2007_000039")  # blank line, no final newline
  assert splits.read_id_list(str(path), "voc") == ("2007_000032", "2007_000039")
  with open(os.path.join(splits.splits_dir(), "voc", "classic", "92_labeled.txt")) as f:
    text = f.read()
  assert not text.endswith("\n") and text.count("\n") == 91  # the real file: 92 entries


@pytest.mark.parametrize("line,dataset,expected", [
    ("JPEGImages/2007_000032.jpg SegmentationClass/2007_000032.png", "voc", "2007_000032"),
    ("2007_000032", "voc", "2007_000032"),
    ("/images/train/jena_000078_000019.png\t/segmentation/train/jena_000078_000019_gtFine.png",
     "cityscapes", "jena_000078_000019"),
    ("leftImg8bit/train/weimar/weimar_000085_000019_leftImg8bit.png "
     "gtFine/train/weimar/weimar_000085_000019_gtFine_labelTrainIds.png", "cityscapes",
     "weimar_000085_000019"),
])
def test_line_formats(line, dataset, expected):
  assert splits.parse_line(line, "f:1", dataset) == expected


def test_bad_lines_are_named(tmp_path):
  with pytest.raises(DataError, match="f:3.*different examples"):
    splits.parse_line("JPEGImages/2007_000032.jpg SegmentationClass/2007_000033.png", "f:3")
  with pytest.raises(DataError, match="not a voc id"):
    splits.parse_line("aachen_000000_000019", "f:1", "voc")
  path = tmp_path / "dup.txt"
  path.write_text("2007_000032\n2007_000039\n2007_000032\n")
  with pytest.raises(DataError, match=r"dup\.txt:3: '2007_000032' is listed twice \(first on "):
    splits.read_id_list(str(path), "voc")


def test_empty_and_missing_lists(tmp_path):
  (tmp_path / "empty.txt").write_text("\n\n")
  with pytest.raises(DataError, match=r"empty\.txt: split list has no entries"):
    splits.read_id_list(str(tmp_path / "empty.txt"))
  with pytest.raises(DataError, match=r"nope\.txt: split list not found"):
    splits.read_id_list(str(tmp_path / "nope.txt"))


def test_unknown_names_list_the_choices():
  with pytest.raises(DataError, match="choices: classic: 92, 183.*blended_u2pl: 1_16, 1_8, 1_4"):
    splits.load_split("voc", "blended", "1_16")
  with pytest.raises(DataError, match="split '1_2'; choices: 1_16, 1_8, 1_4$"):
    splits.load_split("voc", "blended_u2pl", "1_2")
  with pytest.raises(DataError, match=r"unknown dataset 'coco'.*\['voc', 'cityscapes'\]"):
    splits.load_split("coco", "x", "y")
  assert splits.load_split("cityscapes", "cps", "1/8").name == "1_8"


def test_overlap_and_coverage_are_checked(tmp_path):
  d = fixtures.make_voc(str(tmp_path))
  labeled, unlabeled = tmp_path / "l.txt", tmp_path / "u.txt"
  labeled.write_text("2007_000032\n2007_000039\n")
  unlabeled.write_text("2007_000039\n")
  train = fixtures.VOC_TRAIN
  with pytest.raises(DataError, match=r"1 ids are both labeled and unlabeled: 2007_000039"):
    splits.load_split_files(str(labeled), str(unlabeled), dataset="voc", train=train)
  unlabeled.write_text("2008_000002\n")
  with pytest.raises(DataError, match=r"3 train ids are in neither list"):
    splits.load_split_files(str(labeled), str(unlabeled), dataset="voc", train=train)
  unlabeled.write_text("\n".join(train[2:] + ("2012_999999",)))
  with pytest.raises(DataError, match=r"1 ids are not in the train set: 2012_999999"):
    splits.load_split_files(str(labeled), str(unlabeled), dataset="voc", train=train)
  unlabeled.write_text("\n".join(train[2:]))
  spec = splits.load_split_files(str(labeled), str(unlabeled), dataset="voc", train=train)
  voc.check_split_files(spec, d["root"])
  assert spec.num_labeled == 2 and spec.num_unlabeled == 4


def test_split_checked_against_a_root_names_missing_files(tmp_path):
  d = fixtures.make_voc(str(tmp_path))
  spec = splits.load_split("voc", "classic", "1464", directory=d["splits_dir"])
  voc.check_split_files(spec, d["root"])
  assert spec.labeled_ids == fixtures.VOC_FINE_TRAIN
  os.remove(os.path.join(d["root"], "JPEGImages", "2008_000003.jpg"))
  os.remove(os.path.join(d["root"], "SegmentationClass", "2007_000039.png"))
  os.remove(os.path.join(d["root"], "SegmentationClassAug", "2007_000039.png"))
  with pytest.raises(DataError) as e:
    voc.check_split_files(spec, d["root"])
  message = str(e.value)
  assert "2 files not found" in message
  assert "2007_000039.png" in message and "2008_000003.jpg" in message
  assert "--sbd" in message  # says how to fix


def test_split_against_root_cityscapes(tmp_path):
  d = fixtures.make_cityscapes(str(tmp_path), train_ids=False)
  with pytest.raises(DataError, match=r"labelTrainIds\.png.*prepare_data cityscapes"):
    cityscapes.check_split_files(
        splits.load_split("cityscapes", "cps", "1_2", directory=d["splits_dir"]), d["root"])
  spec = splits.load_split("cityscapes", "unimatch", "1_30", directory=d["splits_dir"])
  assert spec.labeled_ids == fixtures.CITY_TRAIN[:1]


@pytest.mark.parametrize("fraction,expected", [(1 / 16, 6), (1 / 8, 13), (1 / 4, 25), (1 / 2, 50),
                                               (1.0, 100)])
def test_fraction_split_counts(fraction, expected):
  # round half up: 100 / 8 = 12.5 -> 13
  labeled, unlabeled = splits.fraction_split(100, fraction, seed=3)
  assert len(labeled) == expected and len(unlabeled) == 100 - expected
  np.testing.assert_array_equal(np.sort(np.concatenate([labeled, unlabeled])), np.arange(100))
  assert labeled.dtype == np.int64 and np.all(np.diff(labeled) > 0)


def test_fraction_split_deterministic_nested_and_seeded():
  a = splits.fraction_split(50, 1 / 8, seed=0)
  b = splits.fraction_split(50, 1 / 8, seed=0)
  np.testing.assert_array_equal(a[0], b[0])
  assert not np.array_equal(a[0], splits.fraction_split(50, 1 / 8, seed=1)[0])
  sets = [set(splits.fraction_split(50, f, seed=7)[0].tolist()) for f in (1 / 16, 1 / 8, 1 / 4,
                                                                          1 / 2, 1)]
  assert all(small <= big for small, big in zip(sets, sets[1:]))  # nested
  assert len(splits.fraction_split(3, 1 / 16, seed=0)[0]) == 1  # at least one labeled


def test_fraction_split_rejects_bad_arguments():
  with pytest.raises(DataError, match="fraction"):
    splits.fraction_split(10, 0.0, 0)
  with pytest.raises(DataError, match="fraction"):
    splits.fraction_split(10, 1.5, 0)
  with pytest.raises(DataError, match="at least one item"):
    splits.fraction_split(0, 0.5, 0)
