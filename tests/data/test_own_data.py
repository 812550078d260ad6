"""Issue 18, data side: background/ignore metadata, val list + fraction, label-value messages."""

import io
import json
import os
import pickle

import ml_collections
import numpy as np
import pytest

from experiments import prepare_data
from semijax.data import (
  cityscapes,
  datasets,
  embedded,
  example_folder,
  folder,
  image_io,
  validation,
  voc,
)
from semijax.data.sources import DataError, DatasetInfo, LabelValueError

from . import fixtures


def _meta(root, **changes):
  path = os.path.join(root, "dataset.json")
  with open(path) as f:
    meta = json.load(f)
  for key, value in changes.items():
    if value is None:
      meta.pop(key, None)
    else:
      meta[key] = value
  with open(path, "w") as f:
    json.dump(meta, f)
  return meta


@pytest.fixture
def textures(tmp_path):
  """The generated example folder, small: 24 masked images (6 listed as val), 4 unlabeled."""
  return example_folder.write_example_folder(str(tmp_path / "textures"), num_images=24,
                                             num_val=6, num_unlabeled=4, size=24)["root"]


def data_cfg(root, split="1/8", val_fraction=0.0):
  return ml_collections.ConfigDict(dict(dataset="folder", root=root, split=split, split_seed=0,
                                        val_fraction=val_fraction, protocol="",
                                        label_format="trainIds"))


# ------------------------------------------------------------------------ metadata


def test_background_class_comes_from_metadata(textures):
  assert voc.INFO.background_class == 0 and embedded.INFO.background_class == 0
  assert cityscapes.INFO.background_class is None
  d = folder.FolderDataset(textures)
  assert d.info.background_class is None          # custom data: none unless declared
  _meta(textures, background_class="checks")      # a name ...
  assert folder.FolderDataset(textures).info.background_class == 1
  _meta(textures, background_class=2)             # ... or an id
  data = datasets.build(data_cfg(textures))
  assert data.info.background_class == 2 and data.background_class == 2
  assert data.ignore_index == 255
  for bad in (3, "sky", True, 1.5):
    _meta(textures, background_class=bad)
    with pytest.raises(DataError, match="background_class"):
      folder.FolderDataset(textures)
  with pytest.raises(DataError, match="background_class 5 is not a class id"):
    DatasetInfo("x", ("a", "b"), np.zeros((2, 3), np.uint8), background_class=5)


def test_undeclared_255_is_refused_with_what_to_write(textures):
  _meta(textures, ignore_index=None)   # the masks keep their 255 border
  parts = folder.load(textures, fraction=0.5)
  with pytest.raises(LabelValueError) as e:
    parts.labeled[0]
  message = str(e.value)
  assert "label values [255]" in message
  assert "valid label ids: 0 stripes, 1 checks, 2 speckles" in message
  assert '"ignore_index": 255' in message and '"value_map": {"255": 1}' in message
  assert e.value.values == (255,) and e.value.path.endswith(".png")
  again = pickle.loads(pickle.dumps(e.value))   # as it comes back from a grain worker
  assert (str(again), again.path, again.values) == (message, e.value.path, (255,))
  _meta(textures, ignore_index=255)    # declared: read as ignore
  label = folder.load(textures, fraction=0.5).labeled[0]["label"]
  assert (label[0] == 255).all() and label.max() == 255


def test_values_outside_the_classes_list_valid_ids_and_every_file(textures):
  d = folder.FolderDataset(textures)
  stems = d.masked_ids
  for stem, value in ((stems[0], 7), (stems[1], 7), (stems[2], 9)):
    path = os.path.join(textures, "masks", stem + ".png")
    label = image_io.read_label(path).copy()
    label[5, 5] = value
    image_io.write_label(path, label)
  source = d.source(stems[:5])
  with pytest.raises(LabelValueError, match=r"label values \[7\] are not valid.*valid label ids: "
                     r"0 stripes, 1 checks, 2 speckles; ignore: 255 \(ignore_index\)"):
    source[0]
  # The up-front check reads every record and lists which files hold which values.
  with pytest.raises(LabelValueError) as e:
    validation.check_source(source, "labeled")
  message = str(e.value)
  assert "label values outside the classes in 3 files" in message
  assert f"7 in 2 files ({source.items[0].label}, {source.items[1].label})" in message
  assert f"9 in 1 file ({source.items[2].label})" in message
  assert "valid label ids: 0 stripes" in message


# ----------------------------------------------------------------------- splits


def test_val_list_combines_with_a_label_fraction(textures):
  meta = json.load(open(os.path.join(textures, "dataset.json")))
  val = tuple(meta["splits"]["val"])
  eighth = folder.load(textures, fraction=1 / 8, seed=0)
  half = folder.load(textures, fraction=1 / 2, seed=0)
  other = folder.load(textures, fraction=1 / 8, seed=3)
  assert eighth.val.ids == half.val.ids == other.val.ids == val
  assert len(eighth.labeled) == 2 and len(half.labeled) == 9    # of the 18 non-val images
  assert set(eighth.labeled.ids) <= set(half.labeled.ids)
  assert not set(val) & set(eighth.labeled.ids + eighth.unlabeled.ids)
  assert len(eighth.unlabeled) == 18 - 2 + 4
  with pytest.raises(DataError, match="lists splits.val .6 images.; val_fraction=0.2 would "
                                      "hold out a second val set"):
    folder.load(textures, fraction=1 / 8, val_fraction=0.2)


def test_config_splits_for_a_folder(textures):
  data = datasets.build(data_cfg(textures, split="1/8"))
  assert len(data.labeled) == 2 and len(data.val) == 6
  assert "6 val (splits.val)" in data.description and "background class: none" in data.description
  with pytest.raises(DataError, match="no \"splits\": {\"labeled\": \\[...\\]} list"):
    datasets.build(data_cfg(textures, split="explicit"))
  _meta(textures, splits=None)
  with pytest.raises(DataError, match=r"no validation images; list them in .*splits.*val_fraction"):
    datasets.build(data_cfg(textures))
  assert len(datasets.build(data_cfg(textures, val_fraction=0.25)).val) == 6
  with pytest.raises(DataError, match=r"split='1/0'; expected a fraction like 1/16"):
    datasets.build(data_cfg(textures, split="1/0", val_fraction=0.25))
  _meta(textures, splits={"labeled": ["tex_0001"], "val": ["tex_0002"]})
  assert datasets.build(data_cfg(textures, split="explicit")).labeled.ids == ("tex_0001",)
  with pytest.raises(DataError, match="lists splits.labeled"):
    datasets.build(data_cfg(textures, split="1/8"))
  for bad, message in (({}, "splits must be an object"), ({"unlabeled": ["tex_0001"]},
                                                          "splits.unlabeled needs splits.labeled"),
                       ({"val": []}, "splits.val is empty"), ({"train": []}, "unknown splits")):
    _meta(textures, splits=bad)
    with pytest.raises(DataError, match=message):
      folder.FolderDataset(textures)


@pytest.mark.parametrize("text,value", [("1/8", 0.125), ("0.125", 0.125), ("full", 1.0),
                                        (" 3/16 ", 0.1875), (0.5, 0.5)])
def test_parse_fraction_accepts_fractions_and_decimals(text, value):
  assert datasets.parse_fraction(text) == value


@pytest.mark.parametrize("text", ["1/0", "2/1", "0", "eighth", "1/8/2", "-0.5"])
def test_parse_fraction_names_the_bad_value(text):
  with pytest.raises(ValueError, match=f"split={text!r}"):
    datasets.parse_fraction(text, name="split")


# ---------------------------------------------------------------- prepare_data


def run(*argv):
  stream = io.StringIO()
  status = prepare_data.main([str(a) for a in argv], stream=stream)
  return status, stream.getvalue()


def test_prepare_data_states_ids_ignore_background_and_the_next_command(textures):
  status, out = run("folder", "--root", textures, "--fraction", "1/8", "--full")
  assert status == 0, out
  assert "valid label ids: 0 stripes, 1 checks, 2 speckles" in out
  assert "ignore value: 255 (ignore_index)" in out and "background class: none" in out
  assert "split=1/8 (fraction 0.125_seed0): 2 labeled, 20 unlabeled, 6 val (from splits.val)" \
      in out
  assert f"mean_teacher.py:dataset=folder,root={textures},split=1/8 " in out
  _meta(textures, ignore_index=None)
  status, out = run("folder", "--root", textures, "--fraction", "0.125")
  assert status == 1
  assert "ignore value: none declared (ignore_index defaults to 255" in out
  assert "24 of 24 masks hold label values outside the classes" in out
  assert "value 255 in 24 files:" in out and '"ignore_index": 255' in out
  assert "failed to read" not in out and "original archives" not in out


def test_prepare_data_warns_without_val_and_about_a_background_name(tmp_path):
  d = fixtures.make_folder(str(tmp_path), num_images=6)  # class 0 is "background"
  status, out = run("folder", "--root", d["root"], "--fraction", "1/2")
  assert status == 0, out   # warnings do not fail the check
  assert "?? warning: no val set" in out and "--config.data.val_fraction=0.2" in out
  assert "?? warning: class 0 is called 'background'" in out and '"background_class": 0' in out
  status, out = run("folder", "--root", d["root"], "--fraction", "1/2", "--val-fraction", "1/3")
  assert "no val set" not in out and "2 val (from --val-fraction 0.333333)" in out


def test_prepare_data_refuses_a_bad_fraction(capsys):
  with pytest.raises(SystemExit) as e:
    prepare_data.parse_args(["folder", "--root", "x", "--fraction", "1/0"])
  assert e.value.code == 2
  assert "--fraction='1/0'; expected a fraction like 1/16" in capsys.readouterr().err


def test_prepare_data_example_writes_a_checked_folder(tmp_path):
  root = tmp_path / "ex"
  status, out = run("example", "--root", root, "--fraction", "1/8", "--sample", "8")
  assert status == 0, out
  assert "320 images with masks (64 listed as val), 64 unlabeled" in out
  assert len(os.listdir(root / "masks")) == 320 and len(os.listdir(root / "unlabeled")) == 64
  parts = folder.load(str(root), fraction=1 / 8)
  assert len(parts.val) == 64 and len(parts.labeled) == 32
  record = parts.val[0]
  assert record["image"].shape == (64, 64, 3) and set(np.unique(record["label"])) <= {0, 1, 2,
                                                                                        255}
