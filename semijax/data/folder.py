"""Custom datasets from a plain folder: images, masks with the same stem, optional unlabeled images.

Layout:

    root/dataset.json
    root/images/NAME.{jpg,jpeg,png,bmp,tif,tiff}   every image here has a mask
    root/masks/NAME.png                            class ids (palette, gray or 1-bit PNG)
    root/unlabeled/NAME.{jpg,...}                  optional images without masks

`dataset.json` (only `class_names` is required; README "Train on your own data"):

    {
      "name": "polyps",                      # default: the folder's name
      "class_names": ["background", "polyp"],# C >= 2 names; id = position (binary: 2 classes)
      "ignore_index": 255,                   # raw mask value of unannotated pixels (default 255,
                                             # but a mask holding 255 is refused until this key
                                             # says it is ignore, or value_map makes it a class)
      "background_class": 0,                 # id (or name) of the "no object" class; default
                                             # none: DGCL then draws anchors from every class
      "palette": [[0, 0, 0], [255, 0, 0]],   # [C, 3] display colours (default: VOC colours)
      "mask_format": "index",                # "index" (values are ids) or "rgb" (colour masks,
                                             # decoded with `palette`)
      "value_map": {"255": 1},               # raw mask value -> class id (or 255 = ignore),
                                             # e.g. 0/255 binary masks
      "splits": {                            # optional lists of file stems, each optional:
        "val": ["d"],                        #   the val set; combines with a fraction split
        "labeled": ["a", "b"],               #   the labeled set (train with split=explicit)
        "unlabeled": ["c"]                   #   with "labeled": default every other image
      },
      "description": "free text"
    }

Gray or RGBA images are converted to RGB. Without `splits.labeled`, `load(root, fraction=,
seed=)` keeps `fraction` of the masked training images labeled (`splits.fraction_split`:
nested across fractions for one seed) and treats the rest, with `unlabeled/`, as unlabeled.
The val set is `splits.val` if given, else `val_fraction` of the masked images held out with
its own fixed seed (the same for every training seed), else none.
"""

import json
import os
from typing import NamedTuple, Optional, Sequence

import numpy as np

from semijax.data import splits
from semijax.data.sources import (
  IGNORE_INDEX,
  DataError,
  DatasetInfo,
  FileItem,
  FileSource,
  list_problems,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
METADATA = "dataset.json"
_KEYS = ("name", "class_names", "ignore_index", "background_class", "palette", "mask_format",
         "value_map", "splits", "description")
SPLIT_KEYS = ("labeled", "unlabeled", "val")
EXAMPLE_METADATA = '{"class_names": ["background", "foreground"], "ignore_index": 255}'


class FolderSplits(NamedTuple):
  """What `load` returns; `val` is None when no validation images were chosen."""
  labeled: FileSource
  unlabeled: FileSource
  val: Optional[FileSource]
  spec: splits.SplitSpec


def _scan(folder: str, extensions: Sequence[str]) -> dict:
  """`{stem: path}` of the files in `folder` (not recursive); a repeated stem is an error."""
  found = {}
  if not os.path.isdir(folder):
    return found
  for name in sorted(os.listdir(folder)):
    stem, ext = os.path.splitext(name)
    if ext.lower() not in extensions or name.startswith("."):
      continue
    if stem in found:
      raise DataError(f"{folder}: two files named {stem!r} ({os.path.basename(found[stem])}, "
                      f"{name}); stems must be unique")
    found[stem] = os.path.join(folder, name)
  return found


def _read_metadata(root: str) -> dict:
  path = os.path.join(root, METADATA)
  if not os.path.isfile(path):
    raise DataError(f"{path}: not found; a custom dataset needs a {METADATA} such as "
                    f"{EXAMPLE_METADATA}")
  try:
    with open(path, encoding="utf-8") as f:
      meta = json.load(f)
  except (ValueError, OSError) as e:
    raise DataError(f"{path}: not valid JSON ({e})") from e
  if not isinstance(meta, dict):
    raise DataError(f"{path}: expected a JSON object such as {EXAMPLE_METADATA}")
  unknown = sorted(set(meta) - set(_KEYS))
  if unknown:
    raise DataError(f"{path}: unknown keys {unknown}; allowed: {list(_KEYS)}")
  return meta


def _label_table(meta: dict, num_classes: int, where: str) -> np.ndarray:
  """`[256]` int16 raw value -> id (255 = ignore, -1 = invalid) from ignore_index and value_map.

  Without a declared `ignore_index` the raw value 255 is invalid (unless `value_map` maps it):
  255 is both the usual "not annotated" value and how many tools write a binary foreground,
  so the folder must say which it means.
  """
  declared = "ignore_index" in meta
  ignore = meta.get("ignore_index", IGNORE_INDEX)
  if isinstance(ignore, bool) or not isinstance(ignore, int) or not 0 <= ignore <= 255:
    raise DataError(f"{where}: ignore_index must be an integer in 0..255, got {ignore!r}")
  if ignore < num_classes:
    raise DataError(f"{where}: ignore_index {ignore} is also a class id (0..{num_classes - 1}); "
                    f"use value_map to move the classes, e.g. for 0 = ignore and classes 1..C")
  lut = np.full(256, -1, np.int16)
  lut[:num_classes] = np.arange(num_classes)
  if declared:
    lut[ignore] = IGNORE_INDEX
  value_map = meta.get("value_map", {})
  if not isinstance(value_map, dict):
    raise DataError(f"{where}: value_map must be an object {{\"raw value\": class id}}")
  for raw, target in value_map.items():
    try:
      raw_value = int(raw)
    except ValueError as e:
      raise DataError(f"{where}: value_map key {raw!r} is not an integer") from e
    if not 0 <= raw_value <= 255 or not isinstance(target, int) or not (
        0 <= target < num_classes or target == IGNORE_INDEX):
      raise DataError(f"{where}: value_map {raw!r}: {target!r} must map 0..255 to a class id "
                      f"in 0..{num_classes - 1} or 255")
    lut[raw_value] = target
  return lut


def _background_class(meta: dict, names: Sequence[str], where: str) -> Optional[int]:
  """`background_class` as an id: given as an id or a name, or None when absent/null."""
  value = meta.get("background_class")
  if value is None:
    return None
  if isinstance(value, str):
    if value not in names:
      raise DataError(f"{where}: background_class {value!r} is not in class_names {list(names)}")
    return list(names).index(value)
  if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(names):
    raise DataError(f"{where}: background_class must be a class id (0..{len(names) - 1}), a name "
                    f"from class_names or null, got {value!r}")
  return value


class FolderDataset:
  """A custom dataset folder (see the module docstring for the layout).

  Args:
    root: the folder.

  Attributes:
    info: `DatasetInfo` from dataset.json (`background_class` included).
    ignore_value: the raw mask value read as ignore (dataset.json `ignore_index`, default 255).
    ignore_declared: whether dataset.json sets `ignore_index` (if not, a raw 255 is refused).
    label_help: the valid raw mask values in words (class ids, ignore, value_map), for messages.
    masked_ids: stems of `images/` (all have masks), sorted.
    extra_unlabeled_ids: stems of `unlabeled/`, sorted.
    all_ids: `masked_ids + extra_unlabeled_ids`; a record's `index` is its position here.
    explicit: the `splits` object of dataset.json, or None.

  Raises:
    DataError: bad metadata, images without masks, masks without images, stem clashes.
  """

  def __init__(self, root: str):
    self.root = root
    if not os.path.isdir(root):
      raise DataError(f"{root}: dataset folder not found")
    where = os.path.join(root, METADATA)
    meta = _read_metadata(root)
    names = meta.get("class_names")
    if (not isinstance(names, list) or len(names) < 2
        or not all(isinstance(n, str) and n for n in names)):
      raise DataError(f"{where}: class_names must list at least 2 non-empty names (id = position; "
                      f"a binary problem is [\"background\", \"foreground\"]), got {names!r}")
    if len(set(names)) != len(names):
      raise DataError(f"{where}: class_names has repeated names")
    if len(names) > 255:
      raise DataError(f"{where}: at most 255 classes fit in 8-bit masks, got {len(names)}")
    if "palette" in meta:
      palette = np.asarray(meta["palette"])
      if palette.shape != (len(names), 3) or palette.min() < 0 or palette.max() > 255:
        raise DataError(f"{where}: palette must be [{len(names)}, 3] colours in 0..255, got "
                        f"shape {palette.shape}")
      palette = palette.astype(np.uint8)
    else:
      from semijax.data.voc import voc_palette
      palette = voc_palette(len(names))
    mask_format = meta.get("mask_format", "index")
    if mask_format not in ("index", "rgb"):
      raise DataError(f"{where}: mask_format must be \"index\" or \"rgb\", got {mask_format!r}")
    if mask_format == "rgb" and "palette" not in meta:
      raise DataError(f"{where}: mask_format \"rgb\" needs the palette that encodes the classes")
    self.info = DatasetInfo(str(meta.get("name") or os.path.basename(os.path.abspath(root))),
                            tuple(names), palette,
                            background_class=_background_class(meta, names, where))
    self.lut = _label_table(meta, len(names), where)
    self.ignore_declared = "ignore_index" in meta
    self.ignore_value = int(meta.get("ignore_index", IGNORE_INDEX))
    self.value_map = {int(k): v for k, v in meta.get("value_map", {}).items()}
    self.label_help = self._label_help(where)
    self.value_hints = {}
    if not self.ignore_declared and self.lut[IGNORE_INDEX] < 0:
      self.value_hints[IGNORE_INDEX] = (
          f"255 is the default ignore_index, but {where} does not declare it: add "
          f"\"ignore_index\": 255 if 255 marks unannotated pixels, or make it a class with "
          f"\"value_map\": {{\"255\": 1}} (0/255 binary masks; any class id instead of 1)")
    self.rgb_palette = palette if mask_format == "rgb" else None

    images = _scan(os.path.join(root, "images"), IMAGE_EXTENSIONS)
    masks = _scan(os.path.join(root, "masks"), (".png",))
    unlabeled = _scan(os.path.join(root, "unlabeled"), IMAGE_EXTENSIONS)
    if not images and not unlabeled:
      raise DataError(f"{root}: no images found in images/ or unlabeled/ (extensions "
                      f"{', '.join(IMAGE_EXTENSIONS)})")
    no_mask = sorted(set(images) - set(masks))
    if no_mask:
      raise DataError(f"{root}: {len(no_mask)} images in images/ have no masks/NAME.png: "
                      f"{list_problems(no_mask)}; put images without masks in unlabeled/")
    no_image = sorted(set(masks) - set(images))
    if no_image:
      raise DataError(f"{root}: {len(no_image)} masks have no image in images/: "
                      f"{list_problems(no_image)}")
    clash = sorted(set(images) & set(unlabeled))
    if clash:
      raise DataError(f"{root}: {len(clash)} names are in both images/ and unlabeled/: "
                      f"{list_problems(clash)}")
    self.images, self.masks, self.unlabeled_images = images, masks, unlabeled
    self.masked_ids = tuple(sorted(images))
    self.extra_unlabeled_ids = tuple(sorted(unlabeled))
    self.all_ids = self.masked_ids + self.extra_unlabeled_ids
    self._position = {k: i for i, k in enumerate(self.all_ids)}
    self.explicit = meta.get("splits")
    if self.explicit is not None:
      self._check_explicit(where)

  def _label_help(self, where: str) -> str:
    """The valid raw mask values in words."""
    parts = [f"valid label ids: {self.info.describe_classes()}"]
    if self.ignore_declared:
      parts.append(f"ignore: {self.ignore_value} (ignore_index)")
    else:
      parts.append("no ignore value (ignore_index not set)")
    if self.value_map:
      parts.append("value_map: " + ", ".join(f"{k} -> {v}" for k, v in self.value_map.items()))
    return "; ".join(parts) + (f". Fix those masks, or add the values to class_names, "
                               f"ignore_index or value_map in {where}")

  def _check_explicit(self, where: str) -> None:
    if not isinstance(self.explicit, dict) or not self.explicit:
      raise DataError(f"{where}: splits must be an object with any of the lists "
                      f"{list(SPLIT_KEYS)}, e.g. {{\"val\": [\"img_007\", \"img_012\"]}}")
    unknown = sorted(set(self.explicit) - set(SPLIT_KEYS))
    if unknown:
      raise DataError(f"{where}: unknown splits keys {unknown}; allowed: {', '.join(SPLIT_KEYS)}")
    if "unlabeled" in self.explicit and "labeled" not in self.explicit:
      raise DataError(f"{where}: splits.unlabeled needs splits.labeled (with a fraction split "
                      "every image that is not labeled or val is unlabeled)")
    seen = {}
    for part in SPLIT_KEYS:
      ids = self.explicit.get(part, [])
      if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise DataError(f"{where}: splits.{part} must be a list of file stems (names without "
                        f"extension), got {type(ids).__name__}")
      pool = self.masked_ids if part != "unlabeled" else self.all_ids
      absent = [i for i in ids if i not in pool]
      if absent:
        kind = "images with masks" if part != "unlabeled" else "images"
        raise DataError(f"{where}: splits.{part} names {len(absent)} stems that are not "
                        f"{kind}: {list_problems(absent)}")
      for i in ids:
        if i in seen:
          raise DataError(f"{where}: {i!r} is in splits.{seen[i]} and splits.{part}")
        seen[i] = part
      if part in self.explicit and not ids:
        raise DataError(f"{where}: splits.{part} is empty (leave the key out instead)")

  @property
  def explicit_labeled(self) -> bool:
    """Whether dataset.json lists the labeled images (`split=explicit`)."""
    return self.explicit is not None and "labeled" in self.explicit

  @property
  def explicit_val(self) -> tuple:
    """The stems of `splits.val` (empty without one)."""
    return tuple((self.explicit or {}).get("val", ()))

  def source(self, ids: Sequence[str], *, labeled: bool = True) -> FileSource:
    """A source over `ids` (stems); `index` is the position in `all_ids`."""
    items = []
    for i in ids:
      if i not in self._position:
        raise DataError(f"{self.root}: no image named {i!r}")
      if labeled and i not in self.masks:
        raise DataError(f"{self.root}: {i!r} has no mask but was asked for as labeled")
      image = self.images.get(i) or self.unlabeled_images[i]
      items.append(FileItem(i, image, self.masks[i] if labeled else None, self._position[i]))
    return FileSource(items, self.info, labeled=labeled, lut=self.lut,
                      rgb_palette=self.rgb_palette, label_help=self.label_help,
                      value_hints=self.value_hints)

  def split(self, *, fraction: Optional[float] = None, seed: int = 0, val_fraction: float = 0.0,
            val_seed: int = 0) -> FolderSplits:
    """Labeled / unlabeled / val sources, from dataset.json `splits` and/or a fraction and seed.

    Args:
      fraction: labeled share of the masked train images (1/16 ... 1), drawn after the val
        images are set aside. Not allowed when dataset.json lists `splits.labeled`. Default:
        `splits.labeled` if given, else 1 (every masked image labeled).
      seed: seed of the labeled/unlabeled draw (`splits.fraction_split`).
      val_fraction: share of the masked images held out for validation (0: none). Not allowed
        with `splits.val`.
      val_seed: seed of the held-out draw (kept apart from `seed` so val is the same for every
        training seed).

    Returns:
      `FolderSplits(labeled, unlabeled, val, spec)`; `val` is None without val images.

    Raises:
      DataError: naming the dataset.json list and the argument that contradict each other.
    """
    where = os.path.join(self.root, METADATA)
    val_ids = self.explicit_val
    if val_ids and val_fraction:
      raise DataError(f"{where} lists splits.val ({len(val_ids)} images); val_fraction="
                      f"{val_fraction:g} would hold out a second val set: leave it at 0")
    if val_fraction and not val_ids:
      if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
      if len(self.masked_ids) < 2:
        raise DataError(f"{self.root}: need at least 2 masked images to hold out a val set")
      held, _ = splits.fraction_split(len(self.masked_ids), val_fraction, val_seed)
      val_ids = tuple(self.masked_ids[i] for i in held)
    if self.explicit_labeled:
      if val_fraction and not self.explicit_val:
        raise DataError(f"{where} lists splits.labeled; a val_fraction could hold out labeled "
                        "images: list the val images in splits.val instead")
      if fraction is not None:
        raise DataError(f"{where} lists splits.labeled, so a labeled fraction ({fraction:g}) "
                        "has nothing to draw from: train on the list with split=explicit, or "
                        "remove splits.labeled to draw the fraction (splits.val can stay)")
      labeled_ids = tuple(self.explicit["labeled"])
      if "unlabeled" in self.explicit:
        unlabeled_ids = tuple(self.explicit["unlabeled"])
      else:
        taken = set(labeled_ids) | set(val_ids)
        unlabeled_ids = tuple(i for i in self.all_ids if i not in taken)
      protocol, name = "explicit", "dataset.json"
    else:
      fraction = 1.0 if fraction is None else float(fraction)
      if not 0.0 < fraction <= 1.0:
        raise DataError(f"labeled fraction must be in (0, 1], got {fraction:g}")
      held = set(val_ids)
      pool = tuple(i for i in self.masked_ids if i not in held)
      if not pool:
        raise DataError(f"{self.root}: no masked images in images/ + masks/ left to label "
                        f"({len(val_ids)} are val)")
      chosen, rest = splits.fraction_split(len(pool), fraction, seed)
      labeled_ids = tuple(pool[i] for i in chosen)
      unlabeled_ids = tuple(pool[i] for i in rest) + self.extra_unlabeled_ids
      protocol, name = "fraction", f"{fraction:g}_seed{seed}"
    spec = splits.SplitSpec(self.info.name, protocol, name, labeled_ids, unlabeled_ids,
                            (where,))
    splits.validate_split(spec)
    val = self.source(val_ids, labeled=True) if val_ids else None
    return FolderSplits(self.source(labeled_ids, labeled=True),
                        self.source(unlabeled_ids, labeled=False), val, spec)


def load(root: str, *, fraction: Optional[float] = None, seed: int = 0, val_fraction: float = 0.0,
         val_seed: int = 0) -> FolderSplits:
  """`FolderDataset(root).split(...)`: the labeled, unlabeled and val sources of a custom folder."""
  return FolderDataset(root).split(fraction=fraction, seed=seed, val_fraction=val_fraction,
                                   val_seed=val_seed)
