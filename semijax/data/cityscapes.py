"""Cityscapes (fine annotations): sources, split loading and the labelIds -> trainIds converter.

Expected folder (`root`), the official layout of `leftImg8bit_trainvaltest.zip` and
`gtFine_trainvaltest.zip`:

    leftImg8bit/{train,val}/CITY/CITY_SEQ_FRAME_leftImg8bit.png
    gtFine/{train,val}/CITY/CITY_SEQ_FRAME_gtFine_labelTrainIds.png    8-bit gray, 0..18 and 255
    gtFine/{train,val}/CITY/CITY_SEQ_FRAME_gtFine_labelIds.png         as downloaded, ids 0..33

The `*_labelTrainIds.png` files are not in the download: cityscapesScripts' `createTrainIdLabelImgs`
makes them, and so does `convert_label_ids` here (or `prepare_data cityscapes --fix`). A source can
also read `*_labelIds.png` and map them on the fly (`label_format='labelIds'`).

The id -> trainId table is the official one (cityscapesScripts `helpers/labels.py`): the 19
evaluated classes get trainIds 0..18; every other id (void classes, parking, rail track, guard
rail, bridge, tunnel, polegroup, caravan, trailer, license plate -1) and every unlisted value
maps to 255 (ignore).
"""

import glob
import os
from typing import Optional, Sequence

import numpy as np

from semijax.data import image_io, splits
from semijax.data.sources import DataError, DatasetInfo, FileItem, FileSource, list_problems

CLASS_NAMES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
               "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck",
               "bus", "train", "motorcycle", "bicycle")
NUM_CLASSES = len(CLASS_NAMES)
PALETTE = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32)], np.uint8)
# Every class is an object: no background class.
INFO = DatasetInfo("cityscapes", CLASS_NAMES, PALETTE, background_class=None)

# Official labelIds (0..33) of the 19 evaluated classes, in trainId order.
EVAL_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
# Every official labelId (plus license plate, -1) and its name, for reports.
LABEL_ID_NAMES = {
    0: "unlabeled", 1: "ego vehicle", 2: "rectification border", 3: "out of roi", 4: "static",
    5: "dynamic", 6: "ground", 7: "road", 8: "sidewalk", 9: "parking", 10: "rail track",
    11: "building", 12: "wall", 13: "fence", 14: "guard rail", 15: "bridge", 16: "tunnel",
    17: "pole", 18: "polegroup", 19: "traffic light", 20: "traffic sign", 21: "vegetation",
    22: "terrain", 23: "sky", 24: "person", 25: "rider", 26: "car", 27: "truck", 28: "bus",
    29: "caravan", 30: "trailer", 31: "train", 32: "motorcycle", 33: "bicycle", -1: "license plate"}

LABEL_FORMATS = ("trainIds", "labelIds")
SPLITS = ("train", "val")
VAL_CITIES = ("frankfurt", "lindau", "munster")
TEST_CITIES = ("berlin", "bielefeld", "bonn", "leverkusen", "mainz", "munich")


def label_id_lut() -> np.ndarray:
  """`[256]` uint8 table: labelId -> trainId; unlisted ids and trainIds 255/-1 -> 255."""
  lut = np.full(256, 255, np.uint8)
  for train_id, label_id in enumerate(EVAL_LABEL_IDS):
    lut[label_id] = train_id
  return lut


LABEL_ID_TO_TRAIN_ID = label_id_lut()


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
  """Maps a `[H, W]` labelId map to trainIds (uint8)."""
  return LABEL_ID_TO_TRAIN_ID[np.asarray(label_ids, np.uint8)]


def city_of(image_id: str) -> str:
  """`aachen_000000_000019` -> `aachen` (city names have no underscore)."""
  return image_id.split("_", 1)[0]


def image_path(root: str, split: str, image_id: str) -> str:
  """`root/leftImg8bit/SPLIT/CITY/ID_leftImg8bit.png`."""
  return os.path.join(root, "leftImg8bit", split, city_of(image_id), image_id + "_leftImg8bit.png")


def label_path(root: str, split: str, image_id: str, label_format: str = "trainIds") -> str:
  """`root/gtFine/SPLIT/CITY/ID_gtFine_labelTrainIds.png` (or `..._labelIds.png`)."""
  if label_format not in LABEL_FORMATS:
    raise DataError(f"label_format must be one of {LABEL_FORMATS}, got {label_format!r}")
  suffix = {"trainIds": "_gtFine_labelTrainIds.png", "labelIds": "_gtFine_labelIds.png"}
  return os.path.join(root, "gtFine", split, city_of(image_id), image_id + suffix[label_format])


def split_of(image_id: str) -> str:
  """`'train'`, `'val'` or `'test'` by city (the official splits have disjoint cities)."""
  city = city_of(image_id)
  return "val" if city in VAL_CITIES else "test" if city in TEST_CITIES else "train"


def missing_files(root: str, ids: Sequence[str], *, labeled: bool,
                  label_format: str = "trainIds") -> list:
  """Files of `ids` missing under `root`."""
  missing = []
  for image_id in ids:
    split = split_of(image_id)
    paths = [image_path(root, split, image_id)]
    if labeled:
      paths.append(label_path(root, split, image_id, label_format))
    missing.extend(p for p in paths if not os.path.isfile(p))
  return missing



def check_split_files(spec: splits.SplitSpec, root: str) -> None:
  """Raises `DataError` naming the files of `spec` missing under `root` (cityscapes layout)."""
  splits.check_files(
      spec, root, missing_files,
      "missing *_gtFine_labelTrainIds.png: run `python -m experiments.prepare_data "
      "cityscapes --root ROOT --fix`")

def scan_ids(root: str, split: str) -> tuple:
  """Ids of the images present under `leftImg8bit/SPLIT/*/`, sorted."""
  pattern = os.path.join(root, "leftImg8bit", split, "*", "*_leftImg8bit.png")
  return tuple(sorted(os.path.basename(p)[:-len("_leftImg8bit.png")] for p in glob.glob(pattern)))


def source(root: str, ids: Sequence[str], *, labeled: bool = True,
           label_format: str = "trainIds", indices: Optional[Sequence[int]] = None) -> FileSource:
  """A Cityscapes source over `ids` (train and val ids may be mixed; the city decides the folder).

  Args:
    root: the folder holding `leftImg8bit/` and `gtFine/`.
    ids: image ids (`CITY_SEQ_FRAME`), in record order.
    labeled: False for the unlabeled part of a split (labels all 255, no mask read).
    label_format: `'trainIds'` (`*_gtFine_labelTrainIds.png`) or `'labelIds'`
      (`*_gtFine_labelIds.png`, mapped to trainIds when read).
    indices: the records' `index` values (default `0..len(ids)-1`).

  Raises:
    DataError: files missing (named, with the fix).
  """
  for folder in ("leftImg8bit",) + (("gtFine",) if labeled else ()):
    if not os.path.isdir(os.path.join(root, folder)):
      raise DataError(f"{root}: no {folder}/ folder; `root` must hold leftImg8bit/ and gtFine/")
  missing = missing_files(root, ids, labeled=labeled, label_format=label_format)
  if missing:
    hint = ""
    if labeled and label_format == "trainIds" and any("labelTrainIds" in p for p in missing):
      hint = (f" Make *_labelTrainIds.png with `python -m experiments.prepare_data cityscapes "
              f"--root {root} --fix`, or read *_labelIds.png directly with "
              f"label_format='labelIds'.")
    raise DataError(f"cityscapes: {len(missing)} files not found: {list_problems(missing)}.{hint}")
  indices = range(len(ids)) if indices is None else indices
  if len(indices) != len(ids):
    raise DataError(f"cityscapes: {len(ids)} ids but {len(indices)} indices")
  items = [FileItem(i, image_path(root, split_of(i), i),
                    label_path(root, split_of(i), i, label_format) if labeled else None, int(k))
           for i, k in zip(ids, indices)]
  lut = LABEL_ID_TO_TRAIN_ID if (labeled and label_format == "labelIds") else None
  return FileSource(items, INFO, labeled=labeled, lut=lut, check_files=False)


def load(root: str, protocol: str, name, *, label_format: str = "trainIds",
         splits_dir: Optional[str] = None) -> tuple:
  """The labeled and unlabeled training sources of a registered split.

  Records' `index` is the image's position in the 2975-image train list.

  Args:
    root: the Cityscapes folder.
    protocol: `'cps'` (1_16..1_2) or `'unimatch'` (1_30).
    name: e.g. `'1_8'` or `'1/8'`.
    label_format: `'trainIds'` or `'labelIds'`.
    splits_dir: optional folder of split lists replacing the shipped ones.

  Returns:
    `(labeled FileSource, unlabeled FileSource, SplitSpec)`.
  """
  spec = splits.load_split("cityscapes", protocol, name, directory=splits_dir)
  position = {k: i for i, k in enumerate(splits.train_ids("cityscapes", directory=splits_dir))}
  labeled = source(root, spec.labeled_ids, labeled=True, label_format=label_format,
                   indices=[position[k] for k in spec.labeled_ids])
  unlabeled = source(root, spec.unlabeled_ids, labeled=False,
                     indices=[position[k] for k in spec.unlabeled_ids])
  return labeled, unlabeled, spec


def val(root: str, *, label_format: str = "trainIds",
        splits_dir: Optional[str] = None) -> FileSource:
  """The 500 val images with labels (`index` = position in `val.txt`)."""
  return source(root, splits.val_ids("cityscapes", directory=splits_dir), labeled=True,
                label_format=label_format)


def convert_label_ids(root: str, *, splits_to_convert: Sequence[str] = SPLITS,
                      overwrite: bool = False) -> int:
  """Writes `*_gtFine_labelTrainIds.png` next to every `*_gtFine_labelIds.png` (official mapping).

  Args:
    root: the Cityscapes folder.
    splits_to_convert: subfolders of `gtFine/` to convert.
    overwrite: rewrite existing trainId files.

  Returns:
    Number of files written.

  Raises:
    DataError: no labelIds files were found, or one fails to read (named).
  """
  written, found = 0, 0
  for split in splits_to_convert:
    pattern = os.path.join(root, "gtFine", split, "*", "*_gtFine_labelIds.png")
    for path in sorted(glob.glob(pattern)):
      found += 1
      out = path[:-len("labelIds.png")] + "labelTrainIds.png"
      if os.path.exists(out) and not overwrite:
        continue
      image_io.write_label(out, label_ids_to_train_ids(image_io.read_label(path)))
      written += 1
  if not found:
    raise DataError(f"{root}: no gtFine/{{{','.join(splits_to_convert)}}}/*/*_gtFine_labelIds.png "
                    f"found; extract gtFine_trainvaltest.zip into {root}")
  return written
