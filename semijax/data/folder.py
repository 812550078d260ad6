"""Custom datasets from a plain folder: images, masks with the same stem, optional unlabeled images.

Layout:

    root/dataset.json
    root/images/NAME.{jpg,jpeg,png,bmp,tif,tiff}   every image here has a mask
    root/masks/NAME.png                            class ids (palette, gray or 1-bit PNG)
    root/unlabeled/NAME.{jpg,...}                  optional images without masks

`dataset.json` (only `class_names` is required):

    {
      "name": "polyps",                      # default: the folder's name
      "class_names": ["background", "polyp"],# C >= 2 names; id = position (binary: 2 classes)
      "ignore_index": 255,                   # mask value meaning "not annotated"; remapped to 255
      "palette": [[0, 0, 0], [255, 0, 0]],   # [C, 3] display colours (default: VOC colours)
      "mask_format": "index",                # "index" (values are ids) or "rgb" (colour masks,
                                             # decoded with `palette`)
      "value_map": {"255": 1},               # raw mask value -> class id, e.g. 0/255 binary masks
      "splits": {                            # explicit splits (stems); replaces fraction splits
        "labeled": ["a", "b"],
        "unlabeled": ["c"],                  # default: every other train image
        "val": ["d"]                         # default: none
      }
    }

Gray or RGBA images are converted to RGB. Without explicit splits, `load(root, fraction=, seed=)`
keeps `fraction` of the masked training images labeled (`splits.fraction_split`: nested across
fractions for one seed) and treats the rest, with `unlabeled/`, as unlabeled; `val_fraction`
holds out a validation set with its own fixed seed, so it is the same for every training seed.
"""

import json
import os
from typing import NamedTuple, Optional, Sequence

import numpy as np

from semijax.data import splits
from semijax.data.sources import (IGNORE_INDEX, DataError, DatasetInfo, FileItem, FileSource,
                                  list_problems)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
METADATA = "dataset.json"
_KEYS = ("name", "class_names", "ignore_index", "palette", "mask_format", "value_map", "splits",
         "description")
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
  """`[256]` int16 raw value -> id (255 = ignore, -1 = invalid) from ignore_index and value_map."""
  ignore = meta.get("ignore_index", IGNORE_INDEX)
  if not isinstance(ignore, int) or not 0 <= ignore <= 255:
    raise DataError(f"{where}: ignore_index must be an integer in 0..255, got {ignore!r}")
  if ignore < num_classes:
    raise DataError(f"{where}: ignore_index {ignore} is also a class id (0..{num_classes - 1}); "
                    f"use value_map to move the classes, e.g. for 0 = ignore and classes 1..C")
  lut = np.full(256, -1, np.int16)
  lut[:num_classes] = np.arange(num_classes)
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


class FolderDataset:
  """A custom dataset folder (see the module docstring for the layout).

  Args:
    root: the folder.

  Attributes:
    info: `DatasetInfo` from dataset.json.
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
                            tuple(names), palette)
    self.lut = _label_table(meta, len(names), where)
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

  def _check_explicit(self, where: str) -> None:
    if not isinstance(self.explicit, dict) or "labeled" not in self.explicit:
      raise DataError(f"{where}: splits must be an object with a \"labeled\" list (and optional "
                      f"\"unlabeled\", \"val\")")
    unknown = sorted(set(self.explicit) - {"labeled", "unlabeled", "val"})
    if unknown:
      raise DataError(f"{where}: unknown splits keys {unknown}; allowed: labeled, unlabeled, val")
    seen = {}
    for part in ("labeled", "unlabeled", "val"):
      ids = self.explicit.get(part, [])
      if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise DataError(f"{where}: splits.{part} must be a list of file stems")
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
    if not self.explicit["labeled"]:
      raise DataError(f"{where}: splits.labeled is empty")

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
    return FileSource(items, self.info, labeled=labeled, lut=self.lut, rgb_palette=self.rgb_palette)

  def split(self, *, fraction: Optional[float] = None, seed: int = 0, val_fraction: float = 0.0,
            val_seed: int = 0) -> FolderSplits:
    """Labeled / unlabeled / val sources, from dataset.json `splits` or by fraction and seed.

    Args:
      fraction: labeled share of the masked train images (1/16 ... 1). Not allowed with explicit
        splits. Default: explicit splits if given, else 1 (every masked image labeled).
      seed: seed of the labeled/unlabeled draw (`splits.fraction_split`).
      val_fraction: share of the masked images held out for validation (0: no val source).
      val_seed: seed of the held-out draw (kept apart from `seed` so val is the same for every
        training seed).

    Returns:
      `FolderSplits(labeled, unlabeled, val, spec)`.
    """
    if self.explicit is not None:
      if fraction is not None or val_fraction:
        raise DataError(f"{os.path.join(self.root, METADATA)} gives explicit splits; do not pass "
                        f"fraction/val_fraction as well")
      labeled_ids = tuple(self.explicit["labeled"])
      val_ids = tuple(self.explicit.get("val", []))
      if "unlabeled" in self.explicit:
        unlabeled_ids = tuple(self.explicit["unlabeled"])
      else:
        taken = set(labeled_ids) | set(val_ids)
        unlabeled_ids = tuple(i for i in self.all_ids if i not in taken)
      protocol, name = "explicit", "dataset.json"
    else:
      fraction = 1.0 if fraction is None else float(fraction)
      pool = self.masked_ids
      val_ids = ()
      if val_fraction:
        if not 0.0 < val_fraction < 1.0:
          raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if len(pool) < 2:
          raise DataError(f"{self.root}: need at least 2 masked images to hold out a val set")
        held, rest = splits.fraction_split(len(pool), val_fraction, val_seed)
        val_ids = tuple(pool[i] for i in held)
        pool = tuple(pool[i] for i in rest)
      if not pool:
        raise DataError(f"{self.root}: no masked images in images/ + masks/ to label")
      chosen, rest = splits.fraction_split(len(pool), fraction, seed)
      labeled_ids = tuple(pool[i] for i in chosen)
      unlabeled_ids = tuple(pool[i] for i in rest) + self.extra_unlabeled_ids
      protocol, name = "fraction", f"{fraction:g}_seed{seed}"
    spec = splits.SplitSpec(self.info.name, protocol, name, labeled_ids, unlabeled_ids,
                            (os.path.join(self.root, METADATA),))
    splits.validate_split(spec)
    val = self.source(val_ids, labeled=True) if val_ids else None
    return FolderSplits(self.source(labeled_ids, labeled=True),
                        self.source(unlabeled_ids, labeled=False), val, spec)


def load(root: str, *, fraction: Optional[float] = None, seed: int = 0, val_fraction: float = 0.0,
         val_seed: int = 0) -> FolderSplits:
  """`FolderDataset(root).split(...)`: the labeled, unlabeled and val sources of a custom folder."""
  return FolderDataset(root).split(fraction=fraction, seed=seed, val_fraction=val_fraction,
                                   val_seed=val_seed)
