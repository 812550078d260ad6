"""Registry of the standard semi-supervised split lists, and the fraction-by-seed splitter.

The lists the papers use ship inside the package (`semijax/data/splits/`, copied unchanged from
their public sources; see the README there). Three line formats occur, all read here:

    JPEGImages/2007_000032.jpg SegmentationClass/2007_000032.png          VOC classic / U2PL / val
    2007_000032                                                           VOC blended (CPS)
    /images/train/aachen_000000_000019.png<TAB>/segmentation/train/...    Cityscapes (CPS)
    leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png gtFine/...  Cityscapes 1/30, val

Every line is reduced to the example's id (`2007_000032`, `aachen_000000_000019`); the datasets
(`voc.py`, `cityscapes.py`) map ids to their own folder layout, so the paths written in a list
never need to match the user's folders. Entries are counted, not newlines (several files lack
a final newline).

Registered splits (`protocols(dataset)`):

    voc         classic       92, 183, 366, 732, 1464   labeled from the 1464 fine-annotated
                                                        train images; unlabeled = the rest of the
                                                        10582 train_aug set
                blended_cps   1_16, 1_8, 1_4, 1_2       662 / 1323 / 2646 / 5291 of train_aug (CPS)
                blended_u2pl  1_16, 1_8, 1_4            same counts, U2PL's own (different) images
    cityscapes  cps           1_16, 1_8, 1_4, 1_2       186 / 372 / 744 / 1488 of the 2975 train
                unimatch      1_30                      100 labeled (UniMatch/DSSN); UniMatch's
                                                        1_16..1_2 lists are the CPS ones

Evaluation lists: `val_ids('voc')` (1449) and `val_ids('cityscapes')` (500). The train set is
VOC `train_aug.txt` (10582) and, for Cityscapes, the union of the CPS 1/2 lists (2975).
"""

import dataclasses
import functools
import os
import re
from typing import Callable, Optional, Sequence

import numpy as np

from semijax.data.sources import DataError, list_problems

DATASETS = ("voc", "cityscapes")

_REGISTRY = {
    "voc": {
        "classic": {n: (f"voc/classic/{n}_labeled.txt", f"voc/classic/{n}_unlabeled.txt")
                    for n in ("92", "183", "366", "732", "1464")},
        "blended_cps": {n: (f"voc/blended_cps/{n}_labeled.txt",
                            f"voc/blended_cps/{n}_unlabeled.txt")
                        for n in ("1_16", "1_8", "1_4", "1_2")},
        "blended_u2pl": {n: (f"voc/blended_u2pl/{n}_labeled.txt",
                             f"voc/blended_u2pl/{n}_unlabeled.txt")
                         for n in ("1_16", "1_8", "1_4")},
    },
    "cityscapes": {
        "cps": {n: (f"cityscapes/cps/{n}_labeled.txt", f"cityscapes/cps/{n}_unlabeled.txt")
                for n in ("1_16", "1_8", "1_4", "1_2")},
        "unimatch": {"1_30": ("cityscapes/1_30_labeled.txt", "cityscapes/1_30_unlabeled.txt")},
    },
}

# Number of labeled images of each registered split, as published (checked by the tests).
LABELED_COUNTS = {
    ("voc", "classic"): {"92": 92, "183": 183, "366": 366, "732": 732, "1464": 1464},
    ("voc", "blended_cps"): {"1_16": 662, "1_8": 1323, "1_4": 2646, "1_2": 5291},
    ("voc", "blended_u2pl"): {"1_16": 662, "1_8": 1323, "1_4": 2646},
    ("cityscapes", "cps"): {"1_16": 186, "1_8": 372, "1_4": 744, "1_2": 1488},
    ("cityscapes", "unimatch"): {"1_30": 100},
}
TRAIN_COUNTS = {"voc": 10582, "cityscapes": 2975}
VAL_COUNTS = {"voc": 1449, "cityscapes": 500}

_VAL_LIST = {"voc": "voc/val.txt", "cityscapes": "cityscapes/val.txt"}
_TRAIN_LIST = {"voc": ("voc/train_aug.txt",),
               # No Cityscapes train list is shipped: the CPS 1/2 lists partition the 2975 images.
               "cityscapes": ("cityscapes/cps/1_2_labeled.txt", "cityscapes/cps/1_2_unlabeled.txt")}

_ID_PATTERNS = {"voc": re.compile(r"^\d{4}_\d{6}$"),
                "cityscapes": re.compile(r"^[a-z]+_\d{6}_\d{6}$")}
# Suffixes the split lists put after the id in file names.
_STEM_SUFFIXES = ("_gtFine_labelTrainIds", "_gtFine_labelIds", "_gtFine_color", "_gtFine",
                  "_leftImg8bit")


def splits_dir() -> str:
  """The folder of the shipped split lists (`semijax/data/splits/`)."""
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), "splits")


@dataclasses.dataclass(frozen=True)
class SplitSpec:
  """A labeled/unlabeled partition of a dataset's train set.

  Attributes:
    dataset: `'voc'`, `'cityscapes'` or a custom dataset name.
    protocol: e.g. `'classic'`, `'blended_cps'`, `'cps'`, `'custom'`.
    name: e.g. `'732'`, `'1_16'`.
    labeled_ids: ids of the labeled images, in list order.
    unlabeled_ids: ids of the unlabeled images, in list order.
    files: the list files read (for messages).
  """
  dataset: str
  protocol: str
  name: str
  labeled_ids: tuple
  unlabeled_ids: tuple
  files: tuple = ()

  @property
  def num_labeled(self) -> int:
    return len(self.labeled_ids)

  @property
  def num_unlabeled(self) -> int:
    return len(self.unlabeled_ids)

  def __repr__(self) -> str:
    return (f"SplitSpec({self.dataset}/{self.protocol}/{self.name}: {self.num_labeled} labeled, "
            f"{self.num_unlabeled} unlabeled)")


def protocols(dataset: str) -> dict:
  """`{protocol: (split names...)}` registered for `dataset`."""
  _check_dataset(dataset)
  return {p: tuple(names) for p, names in _REGISTRY[dataset].items()}


def _check_dataset(dataset: str) -> None:
  if dataset not in _REGISTRY:
    raise DataError(f"unknown dataset {dataset!r}; split lists exist for {list(DATASETS)} "
                    f"(custom datasets: `fraction_split` or explicit lists in dataset.json)")


def normalize_name(name) -> str:
  """`'1/16'`, `'1_16'` -> `'1_16'`; `732`, `'732'` -> `'732'`."""
  return str(name).strip().replace("/", "_")


def parse_line(line: str, where: str, dataset: Optional[str] = None) -> str:
  """Reduces one split-list line to the example id.

  Args:
    line: a non-empty line in any of the formats of the module docstring.
    where: `file:line` for errors.
    dataset: if given, the id must match that dataset's id pattern.

  Returns:
    The id.

  Raises:
    DataError: the line's image and label name different ids, or the id is malformed.
  """
  ids = []
  for token in line.split():
    stem = token.replace("\\", "/").rsplit("/", 1)[-1]
    dot = stem.rfind(".")
    if dot > 0:
      stem = stem[:dot]
    if "_gtFine" in stem or "_leftImg8bit" in stem:
      for suffix in _STEM_SUFFIXES:
        if stem.endswith(suffix):
          stem = stem[:-len(suffix)]
          break
    ids.append(stem)
  if not ids or not ids[0]:
    raise DataError(f"{where}: cannot read an id from {line!r}")
  if len(set(ids)) != 1:
    raise DataError(f"{where}: the entries of {line!r} name different examples {ids}")
  if dataset in _ID_PATTERNS and not _ID_PATTERNS[dataset].match(ids[0]):
    raise DataError(f"{where}: {ids[0]!r} is not a {dataset} id (expected e.g. "
                    f"{'2007_000032' if dataset == 'voc' else 'aachen_000000_000019'})")
  return ids[0]


def read_id_list(path: str, dataset: Optional[str] = None) -> tuple:
  """Reads a split list: one example per non-empty line, in any supported format.

  Args:
    path: the list file.
    dataset: optional dataset name, to check the id pattern.

  Returns:
    The ids in file order.

  Raises:
    DataError: missing file, malformed line, duplicate entry, or no entries at all.
  """
  if not os.path.isfile(path):
    raise DataError(f"{path}: split list not found")
  stat = os.stat(path)
  return _read_id_list(os.path.abspath(path), dataset, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=256)
def _read_id_list(path: str, dataset: Optional[str], mtime_ns: int, size: int) -> tuple:
  del mtime_ns, size  # cache keys only: an edited file is read again
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  ids, first_seen = [], {}
  for number, line in enumerate(lines, 1):
    if not line.strip() or line.lstrip().startswith("#"):
      continue
    key = parse_line(line, f"{path}:{number}", dataset)
    if key in first_seen:
      raise DataError(f"{path}:{number}: {key!r} is listed twice (first on line "
                      f"{first_seen[key]})")
    first_seen[key] = number
    ids.append(key)
  if not ids:
    raise DataError(f"{path}: split list has no entries")
  return tuple(ids)


def _path(relative: str, directory: Optional[str]) -> str:
  return os.path.join(directory or splits_dir(), *relative.split("/"))


def train_ids(dataset: str, *, directory: Optional[str] = None) -> tuple:
  """The ids of the whole train set (VOC train_aug: 10582; Cityscapes train: 2975)."""
  _check_dataset(dataset)
  ids = []
  for relative in _TRAIN_LIST[dataset]:
    ids.extend(read_id_list(_path(relative, directory), dataset))
  if len(set(ids)) != len(ids):
    raise DataError(f"{dataset}: the train lists {_TRAIN_LIST[dataset]} overlap")
  return tuple(ids)


def val_ids(dataset: str, *, directory: Optional[str] = None) -> tuple:
  """The ids of the evaluation set (VOC val: 1449; Cityscapes val: 500)."""
  _check_dataset(dataset)
  return read_id_list(_path(_VAL_LIST[dataset], directory), dataset)


def validate_split(spec: SplitSpec, train: Optional[Sequence[str]] = None) -> SplitSpec:
  """Checks that labeled and unlabeled ids are disjoint and, given `train`, that they cover it.

  Raises:
    DataError: naming the split, the ids that overlap, are missing, or are foreign.
  """
  where = f"{spec.dataset}/{spec.protocol}/{spec.name} ({', '.join(spec.files) or 'in memory'})"
  if not spec.labeled_ids:
    raise DataError(f"{where}: no labeled examples")
  both = sorted(set(spec.labeled_ids) & set(spec.unlabeled_ids))
  if both:
    raise DataError(f"{where}: {len(both)} ids are both labeled and unlabeled: "
                    f"{list_problems(both)}")
  if train is not None:
    train_set, listed = set(train), set(spec.labeled_ids) | set(spec.unlabeled_ids)
    foreign = sorted(listed - train_set)
    if foreign:
      raise DataError(f"{where}: {len(foreign)} ids are not in the train set: "
                      f"{list_problems(foreign)}")
    left_out = sorted(train_set - listed)
    if left_out:
      raise DataError(f"{where}: {len(left_out)} train ids are in neither list: "
                      f"{list_problems(left_out)}")
  return spec


def _choices(dataset: str) -> str:
  return "; ".join(f"{p}: {', '.join(n)}" for p, n in protocols(dataset).items())


def load_split(dataset: str, protocol: str, name, *,
               directory: Optional[str] = None) -> SplitSpec:
  """Loads and validates a registered split.

  Args:
    dataset: `'voc'` or `'cityscapes'`.
    protocol: see `protocols(dataset)`, e.g. `'classic'`, `'blended_cps'`, `'cps'`.
    name: e.g. `732`, `'1_16'` or `'1/16'`.
    directory: read the lists from this folder (same structure as `semijax/data/splits/`)
      instead of the shipped ones.

  Returns:
    The `SplitSpec`, labeled and unlabeled disjoint and covering the train set.

  Raises:
    DataError: unknown protocol or name (the valid choices are listed), an unreadable or empty
      list, overlap or incomplete coverage. (Whether its files exist under a dataset folder is
      the dataset module's check: `voc.check_split_files`, `cityscapes.check_split_files`.)
  """
  _check_dataset(dataset)
  if protocol not in _REGISTRY[dataset]:
    raise DataError(f"unknown {dataset} protocol {protocol!r}; choices: {_choices(dataset)}")
  key = normalize_name(name)
  if key not in _REGISTRY[dataset][protocol]:
    raise DataError(f"unknown {dataset}/{protocol} split {name!r}; choices: "
                    f"{', '.join(_REGISTRY[dataset][protocol])}")
  labeled_file, unlabeled_file = (_path(r, directory) for r in _REGISTRY[dataset][protocol][key])
  spec = SplitSpec(dataset, protocol, key, read_id_list(labeled_file, dataset),
                   read_id_list(unlabeled_file, dataset), (labeled_file, unlabeled_file))
  validate_split(spec, train_ids(dataset, directory=directory))
  return spec


def load_split_files(labeled_file: str, unlabeled_file: Optional[str], *, dataset: str,
                     train: Optional[Sequence[str]] = None,
                     name: Optional[str] = None) -> SplitSpec:
  """Loads a user's own pair of split lists (any of the supported line formats).

  Args:
    labeled_file: list of labeled examples.
    unlabeled_file: list of unlabeled examples, or None for none.
    dataset: `'voc'`, `'cityscapes'` (ids are pattern-checked) or any other name.
    train: optional train ids the two lists must cover; for VOC/Cityscapes the shipped train
      set is used when this is None.
    name: split name for messages (default: the labeled file's name).
  """
  labeled = read_id_list(labeled_file, dataset)
  unlabeled = read_id_list(unlabeled_file, dataset) if unlabeled_file else ()
  files = (labeled_file,) + ((unlabeled_file,) if unlabeled_file else ())
  spec = SplitSpec(dataset, "custom", name or os.path.basename(labeled_file), labeled, unlabeled,
                   files)
  if train is None and dataset in _REGISTRY:
    train = train_ids(dataset)
  validate_split(spec, train)
  return spec


def check_files(spec: SplitSpec, root: str, missing_files: Callable, hint: str) -> None:
  """Raises `DataError` naming the files of `spec` missing under `root`.

  Args:
    spec: the split.
    root: the dataset folder.
    missing_files: the dataset layout's `(root, ids, *, labeled) -> [missing paths]`.
    hint: what usually fixes missing files of this dataset (appended to the message).
  """
  missing = (missing_files(root, spec.labeled_ids, labeled=True)
             + missing_files(root, spec.unlabeled_ids, labeled=False))
  if missing:
    raise DataError(f"{spec!r} under {root}: {len(missing)} files not found: "
                    f"{list_problems(missing)}. ({hint})")


def fraction_split(num_items: int, fraction: float, seed: int) -> tuple:
  """Splits `range(num_items)` into a labeled fraction and the unlabeled rest, by seed.

  The labeled count is `max(1, floor(num_items * fraction + 0.5))` (round half up). The split is
  a prefix of one seeded permutation of the items, so for a fixed `(num_items, seed)` the labeled
  sets are **nested**: the 1/16 labeled set is inside the 1/8 set, which is inside the 1/4 set,
  and so on. Both outputs are sorted.

  Args:
    num_items: N > 0.
    fraction: in (0, 1]; e.g. 1/16, 1/8, 1/4, 1/2, 1.
    seed: the permutation's seed (`numpy.random.default_rng`).

  Returns:
    `(labeled_idx, unlabeled_idx)`: int64 arrays partitioning `range(num_items)`.
  """
  if int(num_items) != num_items or num_items < 1:
    raise DataError(f"fraction_split: need at least one item, got num_items={num_items}")
  if not 0.0 < fraction <= 1.0:
    raise DataError(f"fraction_split: fraction must be in (0, 1], got {fraction}")
  num_items = int(num_items)
  count = min(num_items, max(1, int(np.floor(num_items * fraction + 0.5))))
  order = np.random.default_rng(seed).permutation(num_items)
  return np.sort(order[:count]).astype(np.int64), np.sort(order[count:]).astype(np.int64)
