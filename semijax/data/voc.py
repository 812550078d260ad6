"""PASCAL VOC 2012 (with the SBD augmented masks): sources, split loading and the SBD converter.

Expected folder (`root`, usually `.../VOCdevkit/VOC2012`):

    JPEGImages/ID.jpg              all 17125 images (train_aug and val are subsets)
    SegmentationClass/ID.png       2913 fine masks (1464 train + 1449 val), palette PNGs
    SegmentationClassAug/ID.png    SBD masks (palette or 8-bit gray PNGs), made from
                                   `benchmark_RELEASE/dataset/cls/*.mat` by `convert_sbd`

Class ids: 0 background, 1..20 objects, 255 ignore (the void border of the fine masks).

Which mask an image gets (`label_dir='auto'`, the default): its fine `SegmentationClass` mask when
there is one, otherwise its `SegmentationClassAug` mask. This reproduces what the semi-supervised
references train on: U2PL and UniMatch read every list entry from `SegmentationClass/ID.png` of a
merged folder that, per the UniMatch maintainer (LiheYoung/UniMatch#2), holds the official 1464
high-quality train masks plus the 9118 coarser SBD masks, 10582 in all. Hence the labeled images
of the *classic* protocol (all drawn from the 1464) are trained on fine masks, while blended-split
labeled images outside the 1464 use SBD masks. Unlabeled images never read a mask. A merged
folder like UniMatch's, put in place as `SegmentationClass`, also works unchanged. Use
`label_dir='aug'` to force SBD masks everywhere (mmseg-style `SegmentationClassAug`-only
training) or `'fine'` to allow only fine masks.
"""

import glob
import os
from typing import Optional, Sequence

import numpy as np

from semijax import extras
from semijax.data import image_io, splits
from semijax.data.sources import DataError, DatasetInfo, FileItem, FileSource, list_problems

CLASS_NAMES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
               "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
               "pottedplant", "sheep", "sofa", "train", "tvmonitor")
NUM_CLASSES = len(CLASS_NAMES)

IMAGE_DIR = "JPEGImages"
FINE_DIR = "SegmentationClass"
AUG_DIR = "SegmentationClassAug"
LABEL_DIRS = ("auto", "fine", "aug")


def voc_palette(num_entries: int = 256) -> np.ndarray:
  """The standard PASCAL VOC colour map: entry i spreads the bits of i over R, G, B.

  Bit 3k (3k+1, 3k+2) of i becomes bit 7-k of red (green, blue), so 1 -> (128, 0, 0),
  15 -> (192, 128, 128) (person) and 255 -> (224, 224, 192) (the void border).

  Returns:
    `[num_entries, 3]` uint8.
  """
  out = np.zeros((num_entries, 3), np.uint8)
  for i in range(num_entries):
    code, rgb = i, [0, 0, 0]
    for bit in range(8):
      for channel in range(3):
        rgb[channel] |= ((code >> channel) & 1) << (7 - bit)
      code >>= 3
    out[i] = rgb
  return out


PALETTE = voc_palette(NUM_CLASSES)
INFO = DatasetInfo("voc", CLASS_NAMES, PALETTE, background_class=0)


def image_path(root: str, image_id: str) -> str:
  """`root/JPEGImages/ID.jpg`."""
  return os.path.join(root, IMAGE_DIR, image_id + ".jpg")


def label_path(root: str, image_id: str, label_dir: str = "auto") -> Optional[str]:
  """The mask file `image_id` uses under `label_dir` policy, or None if there is none."""
  if label_dir not in LABEL_DIRS:
    raise DataError(f"label_dir must be one of {LABEL_DIRS}, got {label_dir!r}")
  fine = os.path.join(root, FINE_DIR, image_id + ".png")
  aug = os.path.join(root, AUG_DIR, image_id + ".png")
  candidates = {"auto": (fine, aug), "fine": (fine,), "aug": (aug,)}[label_dir]
  for path in candidates:
    if os.path.isfile(path):
      return path
  return None


def missing_files(root: str, ids: Sequence[str], *, labeled: bool,
                  label_dir: str = "auto") -> list:
  """Paths (or `SegmentationClass[Aug]/ID.png` descriptions) missing under `root`."""
  missing = []
  for image_id in ids:
    if not os.path.isfile(image_path(root, image_id)):
      missing.append(image_path(root, image_id))
    if labeled and label_path(root, image_id, label_dir) is None:
      where = {"auto": f"{FINE_DIR} or {AUG_DIR}", "fine": FINE_DIR, "aug": AUG_DIR}[label_dir]
      missing.append(os.path.join(root, f"{{{where}}}", image_id + ".png"))
  return missing



def check_split_files(spec: splits.SplitSpec, root: str) -> None:
  """Raises `DataError` naming the files of `spec` missing under `root` (voc layout)."""
  splits.check_files(
      spec, root, missing_files,
      "labels missing from SegmentationClassAug usually mean the SBD masks were not "
      "converted: run `python -m experiments.prepare_data voc --root ROOT --fix --sbd "
      "SBD/benchmark_RELEASE/dataset`")

def source(root: str, ids: Sequence[str], *, labeled: bool = True, label_dir: str = "auto",
           indices: Optional[Sequence[int]] = None) -> FileSource:
  """A VOC source over `ids`.

  Args:
    root: the VOC2012 folder.
    ids: image ids, in record order.
    labeled: False for the unlabeled part of a split (no mask is read; labels are all 255).
    label_dir: `'auto'` (fine mask if any, else SBD), `'fine'` or `'aug'`; see the module doc.
    indices: the records' `index` values (default `0..len(ids)-1`).

  Raises:
    DataError: files missing (named, with the fix).
  """
  if not os.path.isdir(os.path.join(root, IMAGE_DIR)):
    raise DataError(f"{root}: no {IMAGE_DIR}/ folder; `root` must be the VOC2012 folder "
                    f"(JPEGImages, SegmentationClass, SegmentationClassAug)")
  missing = missing_files(root, ids, labeled=labeled, label_dir=label_dir)
  if missing:
    raise DataError(f"voc: {len(missing)} files not found: {list_problems(missing)}. Masks "
                    f"missing from {AUG_DIR} are made from SBD with `python -m "
                    f"experiments.prepare_data voc --root {root} --fix --sbd "
                    f"SBD/benchmark_RELEASE/dataset`")
  indices = range(len(ids)) if indices is None else indices
  if len(indices) != len(ids):
    raise DataError(f"voc: {len(ids)} ids but {len(indices)} indices")
  items = [FileItem(i, image_path(root, i), label_path(root, i, label_dir) if labeled else None,
                    int(k)) for i, k in zip(ids, indices)]
  return FileSource(items, INFO, labeled=labeled, check_files=False)


def load(root: str, protocol: str, name, *, label_dir: str = "auto",
         splits_dir: Optional[str] = None) -> tuple:
  """The labeled and unlabeled training sources of a registered split.

  Records' `index` is the image's position in `train_aug` (10582), unique across both sources.

  Args:
    root: the VOC2012 folder.
    protocol: `'classic'`, `'blended_cps'` or `'blended_u2pl'`.
    name: `92..1464` (classic) or `'1_16'..'1_2'` (blended).
    label_dir: mask policy, see the module doc.
    splits_dir: optional folder of split lists replacing the shipped ones.

  Returns:
    `(labeled FileSource, unlabeled FileSource, SplitSpec)`.
  """
  spec = splits.load_split("voc", protocol, name, directory=splits_dir)
  position = {k: i for i, k in enumerate(splits.train_ids("voc", directory=splits_dir))}
  labeled = source(root, spec.labeled_ids, labeled=True, label_dir=label_dir,
                   indices=[position[k] for k in spec.labeled_ids])
  unlabeled = source(root, spec.unlabeled_ids, labeled=False,
                     indices=[position[k] for k in spec.unlabeled_ids])
  return labeled, unlabeled, spec


def val(root: str, *, splits_dir: Optional[str] = None) -> FileSource:
  """The 1449 val images with their fine masks (`index` = position in `val.txt`)."""
  return source(root, splits.val_ids("voc", directory=splits_dir), labeled=True, label_dir="fine")


# ---------------------------------------------------------------------------------------------
# SBD (Hariharan et al. 2011) -> SegmentationClassAug
# ---------------------------------------------------------------------------------------------


def read_sbd_mat(path: str) -> np.ndarray:
  """Reads the class mask of an SBD `cls/ID.mat` file (MATLAB struct `GTcls.Segmentation`).

  Returns:
    `[H, W]` uint8 class ids in 0..20 (SBD has no void border).

  Raises:
    DataError: unreadable file, no `GTcls.Segmentation`, or values outside 0..20.
  """
  scipy_io = extras.require("scipy.io", "scipy", "sbd", "reading SBD .mat files")
  if not os.path.isfile(path):
    raise DataError(f"{path}: file not found")
  try:
    mat = scipy_io.loadmat(path, squeeze_me=True, struct_as_record=False)
  except Exception as e:  # scipy raises ValueError, TypeError, MatReadError... on bad files
    raise DataError(f"{path}: cannot read MATLAB file ({type(e).__name__}: {e})") from e
  gt = mat.get("GTcls")
  seg = getattr(gt, "Segmentation", None)
  if seg is None:
    raise DataError(f"{path}: no GTcls.Segmentation struct field; expected an SBD "
                    f"`dataset/cls/*.mat` file (the `inst/` files hold instance masks)")
  seg = np.asarray(seg)
  if seg.ndim != 2:
    raise DataError(f"{path}: GTcls.Segmentation has shape {seg.shape}; expected [H, W]")
  if seg.size and (seg.min() < 0 or seg.max() >= NUM_CLASSES):
    bad = sorted(set(np.unique(seg).tolist()) - set(range(NUM_CLASSES)))
    raise DataError(f"{path}: GTcls.Segmentation has values {bad[:10]} outside 0..20")
  return seg.astype(np.uint8)


def find_sbd_cls_dir(sbd_dir: str) -> str:
  """Accepts `benchmark_RELEASE`, `benchmark_RELEASE/dataset` or `.../dataset/cls`."""
  for candidate in (sbd_dir, os.path.join(sbd_dir, "cls"), os.path.join(sbd_dir, "dataset", "cls")):
    if os.path.isdir(candidate) and glob.glob(os.path.join(candidate, "*.mat")):
      return candidate
  raise DataError(f"{sbd_dir}: no SBD class masks found; expected benchmark_RELEASE/dataset/cls/"
                  f"*.mat (download benchmark.tgz from the SBD page and extract it)")


def convert_sbd(sbd_dir: str, out_dir: str, *, ids: Optional[Sequence[str]] = None,
                overwrite: bool = False) -> int:
  """Writes SBD class masks as VOC palette PNGs (`out_dir/ID.png`, usually SegmentationClassAug).

  Args:
    sbd_dir: SBD folder (see `find_sbd_cls_dir`).
    out_dir: output folder, created if needed.
    ids: convert only these ids (e.g. the train_aug ids missing a mask); default all `.mat` files.
    overwrite: rewrite existing PNGs.

  Returns:
    Number of files written.

  Raises:
    DataError: a requested id has no `.mat` file, or a file fails to read (named).
  """
  cls_dir = find_sbd_cls_dir(sbd_dir)
  if ids is None:
    ids = sorted(os.path.splitext(os.path.basename(p))[0]
                 for p in glob.glob(os.path.join(cls_dir, "*.mat")))
  else:
    absent = [i for i in ids if not os.path.isfile(os.path.join(cls_dir, i + ".mat"))]
    if absent:
      raise DataError(f"{cls_dir}: {len(absent)} ids have no SBD mask: {list_problems(absent)}")
  written = 0
  for image_id in ids:
    out = os.path.join(out_dir, image_id + ".png")
    if os.path.exists(out) and not overwrite:
      continue
    image_io.write_label(out, read_sbd_mat(os.path.join(cls_dir, image_id + ".mat")),
                         voc_palette())
    written += 1
  return written
