"""Tiny datasets in the exact real layouts, generated into a temporary folder at test time.

Nothing binary is committed: each generator writes a handful of small JPEG/PNG files (real VOC
palette PNGs, SBD `.mat` files via `scipy.io.savemat`, Cityscapes labelIds / labelTrainIds) and,
for VOC and Cityscapes, split lists in the shipped formats, and returns what a correct reader
must produce.
"""

import json
import os
import zlib

import numpy as np
import scipy.io
from PIL import Image

from semijax.data import cityscapes, image_io, voc

SIZE = (20, 28)  # H, W of every fixture image

# VOC: three images of the 1464 fine-annotated train set, three SBD-only train images, two val.
VOC_FINE_TRAIN = ("2007_000032", "2007_000039", "2008_000008")
VOC_SBD_TRAIN = ("2008_000002", "2008_000003", "2009_000001")
VOC_TRAIN = VOC_FINE_TRAIN + VOC_SBD_TRAIN
VOC_VAL = ("2007_000033", "2007_000042")

CITY_TRAIN = ("aachen_000000_000019", "aachen_000001_000019", "bochum_000000_000313",
              "jena_000078_000019")
CITY_VAL = ("frankfurt_000000_000294", "lindau_000000_000019")


def _rng(key: str) -> np.random.Generator:
  return np.random.default_rng(zlib.crc32(key.encode()))


def random_image(key: str, size=SIZE) -> np.ndarray:
  """A smooth random RGB image (JPEG-friendly)."""
  rng = _rng("img" + key)
  coarse = rng.integers(0, 256, (size[0] // 4 + 1, size[1] // 4 + 1, 3)).astype(np.uint8)
  return np.repeat(np.repeat(coarse, 4, 0), 4, 1)[:size[0], :size[1]]


def random_label(key: str, values, size=SIZE) -> np.ndarray:
  """Blocky label map drawing from `values` (every value appears at least once)."""
  rng = _rng("lab" + key)
  values = np.asarray(values, np.uint8)
  label = values[rng.integers(0, len(values), size)]
  label.reshape(-1)[:len(values)] = values
  return label


def _write_list(path: str, lines, final_newline: bool = True) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write("\n".join(lines) + ("\n" if final_newline else ""))


def voc_line(image_id: str) -> str:
  return f"JPEGImages/{image_id}.jpg SegmentationClass/{image_id}.png"


def make_voc(tmp: str) -> dict:
  """A VOC2012 folder, an SBD folder and a split-list folder.

  Returns:
    `{'root', 'sbd', 'splits_dir', 'fine': {id: label}, 'aug': {id: label}, 'images': {id: rgb}}`
    where `fine` holds the SegmentationClass masks (with a 255 border) and `aug` the
    SegmentationClassAug (= SBD) masks.
  """
  root, sbd = os.path.join(tmp, "VOC2012"), os.path.join(tmp, "benchmark_RELEASE", "dataset")
  images, fine, aug = {}, {}, {}
  for image_id in VOC_TRAIN + VOC_VAL:
    images[image_id] = random_image(image_id)
    image_io.write_image(voc.image_path(root, image_id), images[image_id])
  for image_id in VOC_FINE_TRAIN + VOC_VAL:  # fine masks: palette PNGs with a void border
    label = random_label(image_id, [0, 1, 15, 20])
    label[0, :] = 255
    fine[image_id] = label
    image_io.write_label(os.path.join(root, voc.FINE_DIR, image_id + ".png"), label,
                         voc.voc_palette())
  for image_id in VOC_TRAIN:  # SBD masks (also for the fine ids, as in the real SBD)
    label = random_label("sbd" + image_id, [0, 3, 7, 12])
    aug[image_id] = label
    mat = os.path.join(sbd, "cls", image_id + ".mat")
    os.makedirs(os.path.dirname(mat), exist_ok=True)
    scipy.io.savemat(mat, {"GTcls": {"Segmentation": label, "Boundaries": np.zeros((1, 1)),
                                     "CategoriesPresent": np.unique(label[label > 0])}})
    # SegmentationClassAug as distributed: 8-bit gray PNGs.
    image_io.write_label(os.path.join(root, voc.AUG_DIR, image_id + ".png"), label)
  splits_dir = os.path.join(tmp, "splits")
  _write_list(os.path.join(splits_dir, "voc", "train_aug.txt"), [voc_line(i) for i in VOC_TRAIN])
  _write_list(os.path.join(splits_dir, "voc", "val.txt"), [voc_line(i) for i in VOC_VAL])
  classic = os.path.join(splits_dir, "voc", "classic")
  _write_list(os.path.join(classic, "1464_labeled.txt"), [voc_line(i) for i in VOC_FINE_TRAIN],
              final_newline=False)
  _write_list(os.path.join(classic, "1464_unlabeled.txt"), [voc_line(i) for i in VOC_SBD_TRAIN],
              final_newline=False)
  _write_list(os.path.join(classic, "92_labeled.txt"), [voc_line(VOC_FINE_TRAIN[1])],
              final_newline=False)
  _write_list(os.path.join(classic, "92_unlabeled.txt"),
              [voc_line(i) for i in VOC_TRAIN if i != VOC_FINE_TRAIN[1]], final_newline=False)
  blended = os.path.join(splits_dir, "voc", "blended_cps")
  _write_list(os.path.join(blended, "1_2_labeled.txt"),
              ["2007_000032", "2008_000002", "2009_000001"])
  _write_list(os.path.join(blended, "1_2_unlabeled.txt"), ["2007_000039", "2008_000008",
                                                           "2008_000003"])
  return {"root": root, "sbd": sbd, "splits_dir": splits_dir, "fine": fine, "aug": aug,
          "images": images}


def make_cityscapes(tmp: str, *, train_ids: bool = True) -> dict:
  """A Cityscapes folder with labelIds (0..33) and, if `train_ids`, labelTrainIds files.

  Returns:
    `{'root', 'splits_dir', 'label_ids': {id: labelIds map}, 'images': {id: rgb}}`.
  """
  root = os.path.join(tmp, "cityscapes")
  label_ids, images = {}, {}
  for split, ids in (("train", CITY_TRAIN), ("val", CITY_VAL)):
    for image_id in ids:
      images[image_id] = random_image(image_id)
      image_io.write_image(cityscapes.image_path(root, split, image_id), images[image_id])
      label_ids[image_id] = random_label(image_id, np.arange(34))
      image_io.write_label(cityscapes.label_path(root, split, image_id, "labelIds"),
                           label_ids[image_id])
      if train_ids:
        image_io.write_label(cityscapes.label_path(root, split, image_id, "trainIds"),
                             cityscapes.label_ids_to_train_ids(label_ids[image_id]))
  splits_dir = os.path.join(tmp, "splits")

  def cps(i):
    return f"/images/train/{i}.png\t/segmentation/train/{i}_gtFine.png"

  def official(i, split="train"):
    city = cityscapes.city_of(i)
    return (f"leftImg8bit/{split}/{city}/{i}_leftImg8bit.png "
            f"gtFine/{split}/{city}/{i}_gtFine_labelTrainIds.png")

  cps_dir = os.path.join(splits_dir, "cityscapes", "cps")
  _write_list(os.path.join(cps_dir, "1_2_labeled.txt"), [cps(i) for i in CITY_TRAIN[:2]])
  _write_list(os.path.join(cps_dir, "1_2_unlabeled.txt"), [cps(i) for i in CITY_TRAIN[2:]])
  _write_list(os.path.join(cps_dir, "1_16_labeled.txt"), [cps(CITY_TRAIN[3])])
  _write_list(os.path.join(cps_dir, "1_16_unlabeled.txt"), [cps(i) for i in CITY_TRAIN[:3]])
  _write_list(os.path.join(splits_dir, "cityscapes", "1_30_labeled.txt"),
              [official(CITY_TRAIN[0])], final_newline=False)
  _write_list(os.path.join(splits_dir, "cityscapes", "1_30_unlabeled.txt"),
              [official(i) for i in CITY_TRAIN[1:]], final_newline=False)
  _write_list(os.path.join(splits_dir, "cityscapes", "val.txt"),
              [official(i, "val") for i in CITY_VAL], final_newline=False)
  return {"root": root, "splits_dir": splits_dir, "label_ids": label_ids, "images": images}


def make_folder(tmp: str, *, metadata=None, num_images: int = 8, num_unlabeled: int = 2,
                values=(0, 1), gray_images: bool = False, name: str = "custom") -> dict:
  """A custom folder dataset: images/*.png|jpg, masks/*.png, unlabeled/*.jpg, dataset.json.

  Returns:
    `{'root', 'masks': {stem: raw mask}, 'images': {stem: rgb}}`.
  """
  root = os.path.join(tmp, name)
  metadata = {"class_names": ["background", "foreground"]} if metadata is None else metadata
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, "dataset.json"), "w") as f:
    json.dump(metadata, f)
  masks, images = {}, {}
  for k in range(num_images):
    stem = f"case_{k:03d}"
    image = random_image(stem)
    images[stem] = image
    path = os.path.join(root, "images", stem + (".png" if k % 2 else ".jpg"))
    if gray_images:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      Image.fromarray(image[..., 0]).save(path)
      images[stem] = np.repeat(image[..., :1], 3, axis=-1)
    else:
      image_io.write_image(path, image)
    masks[stem] = random_label(stem, values)
    image_io.write_label(os.path.join(root, "masks", stem + ".png"), masks[stem])
  for k in range(num_unlabeled):
    stem = f"extra_{k:03d}"
    images[stem] = random_image(stem)
    image_io.write_image(os.path.join(root, "unlabeled", stem + ".jpg"), images[stem])
  return {"root": root, "masks": masks, "images": images}


def corrupt(path: str, keep: int = 30) -> None:
  """Truncates a file to its first `keep` bytes."""
  with open(path, "rb") as f:
    head = f.read(keep)
  with open(path, "wb") as f:
    f.write(head)
