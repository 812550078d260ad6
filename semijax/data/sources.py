"""Random-access segmentation sources: the one interface every dataset implements.

A source is a grain `RandomAccessDataSource` (`__len__`, `__getitem__`) whose records are

    {'image': uint8 [H, W, 3], 'label': uint8 [H, W], 'index': int64}

`label` holds class ids in `[0, num_classes)` and `ignore_index` (255); unlabeled sources
return an all-ignore label map so that every record has the same structure. Sources also
carry the dataset's metadata (`DatasetInfo`). Records are validated where they are read, so
a bad file is named at the moment it is met (see `check_label`).
"""

import dataclasses
import json
import os
from typing import Optional, Sequence

import numpy as np

from semijax.data import image_io
from semijax.data.errors import IGNORE_INDEX, DataError  # noqa: F401  (re-exported)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Metadata of a segmentation dataset.

  Attributes:
    name: the dataset's name.
    class_names: C names, index = class id.
    palette: `[C, 3]` uint8 colours for visualisation.
    ignore_index: the label value of pixels without a label in the records (always 255 in
      semijax; a custom folder's own ignore value is remapped to it when read).
    background_class: the id of the class that means "no object" (VOC and the embedded
      digits: 0), or None when no class is background (Cityscapes; custom folders unless
      their `dataset.json` sets `background_class`). Methods that treat background specially
      (DGCL's anchor classes) read it from here, never assume an id.
  """
  name: str
  class_names: tuple
  palette: np.ndarray
  ignore_index: int = IGNORE_INDEX
  background_class: Optional[int] = None

  def __post_init__(self):
    if self.background_class is not None and not 0 <= self.background_class < len(
        self.class_names):
      raise DataError(f"{self.name}: background_class {self.background_class} is not a class id "
                      f"(0..{len(self.class_names) - 1})")

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def describe_classes(self) -> str:
    """`0 background, 1 cat, ...` (the valid label ids, for messages)."""
    return ", ".join(f"{i} {n}" for i, n in enumerate(self.class_names))


class LabelValueError(DataError):
  """A label file holds values that are neither class ids nor the ignore value.

  Attributes:
    path: the file (or record name).
    values: the offending raw values, sorted.
  """

  def __init__(self, message: str, path: str = "", values=()):
    super().__init__(message)
    self.path, self.values = path, tuple(int(v) for v in values)

  def __reduce__(self):   # survives pickling out of a grain worker process
    return type(self), (str(self), self.path, self.values)


def check_label(label: np.ndarray, num_classes: int, where: str,
                ignore_index: int = IGNORE_INDEX) -> np.ndarray:
  """Raises `DataError` naming `where` if `label` has values outside [0, C) and ignore.

  Out-of-range values raise `LabelValueError` (a `DataError`) carrying the file and values.
  """
  if label.ndim != 2:
    raise DataError(f"{where}: label map must be 2-D [H, W], got shape {label.shape}")
  values = np.unique(label)
  bad = values[(values >= num_classes) & (values != ignore_index)]
  if bad.size:
    raise LabelValueError(f"{where}: label values {bad.tolist()} outside the class ids "
                          f"0..{num_classes - 1} and the ignore value {ignore_index}", where,
                          bad.tolist())
  return label


class ArraySource:
  """A source over in-memory arrays (the embedded dataset, tests, small custom sets).

  Args:
    images: `[N, H, W, 3]` uint8.
    labels: `[N, H, W]` uint8, or None for an unlabeled source (all-ignore labels).
    info: dataset metadata.
    indices: optional subset (a split) of the rows, in order.
    hide_labels: serve the rows as unlabeled images (all-ignore `label`) whose ground truth
      travels as `hidden_label`, for diagnostics that a loss never reads.
  """

  def __init__(self, images: np.ndarray, labels: Optional[np.ndarray], info: DatasetInfo,
               indices: Optional[Sequence[int]] = None, *, hide_labels: bool = False):
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
      raise DataError(f"{info.name}: images must be uint8 [N, H, W, 3], got "
                      f"{images.dtype} {images.shape}")
    if labels is not None and labels.shape != images.shape[:3]:
      raise DataError(f"{info.name}: labels {labels.shape} do not match images "
                      f"{images.shape[:3]}")
    self.images, self.labels, self.info = images, labels, info
    self.hide_labels = hide_labels and labels is not None
    self.indices = np.arange(len(images)) if indices is None else np.asarray(indices)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> dict:
    row = int(self.indices[i])
    image = self.images[row]
    if self.labels is None:
      label = np.full(image.shape[:2], self.info.ignore_index, np.uint8)
    else:
      label = check_label(self.labels[row], self.info.num_classes, f"{self.info.name}[{row}]",
                          self.info.ignore_index)
    if self.hide_labels:
      hidden = np.full(image.shape[:2], self.info.ignore_index, np.uint8)
      return {"image": image, "label": hidden, "hidden_label": label, "index": np.int64(row)}
    return {"image": image, "label": label, "index": np.int64(row)}

  def __repr__(self) -> str:
    return f"ArraySource({self.info.name}, {len(self)} records)"


# ---------------------------------------------------------------------------------------------
# File-backed sources (real datasets). Added with the VOC / Cityscapes / custom-folder readers;
# everything above is unchanged.
# ---------------------------------------------------------------------------------------------

_MAX_LISTED = 10  # how many offending files an error message names before giving a count


def list_problems(paths: Sequence[str], limit: int = _MAX_LISTED) -> str:
  """Formats the first `limit` entries of `paths` plus a count of the rest, for error messages."""
  shown = ", ".join(str(p) for p in paths[:limit])
  more = len(paths) - limit
  return shown + (f" ... and {more} more" if more > 0 else "")


@dataclasses.dataclass(frozen=True)
class FileItem:
  """One example on disk.

  Attributes:
    id: the dataset's name for it (VOC `2007_000032`, Cityscapes `aachen_000000_000019`, a
      custom dataset's file stem).
    image: path of the image file.
    label: path of the label file, or None when there is none (unlabeled).
    index: the record's `index`, unique within the dataset split it comes from (e.g. position in
      VOC `train_aug`), so that labeled and unlabeled sources of one split never collide.
  """
  id: str
  image: str
  label: Optional[str] = None
  index: int = 0


class FileSource:
  """A source that decodes image and label files on access (VOC, Cityscapes, custom folders).

  Files are checked to exist when the source is built (`check_files=True`), so a missing file is
  reported before training starts; decoding errors, size mismatches and out-of-range label
  values raise `DataError` naming the file when the record is read.

  Args:
    items: the examples, in record order.
    info: dataset metadata (class count for `check_label`).
    labeled: if False the label files are not read and every label is all-ignore.
    lut: optional `[256]` integer table applied to raw label values (e.g. Cityscapes labelIds ->
      trainIds, or a custom ignore value -> 255); entries -1 mark raw values that are invalid
      (a `LabelValueError` names the file). A plain array, so the source pickles into grain
      workers.
    rgb_palette: optional `[C, 3]` colours to decode colour-coded RGB masks.
    check_files: stat every file at construction.
    label_help: optional text appended to a `LabelValueError`: which raw values are valid and
      how to map others (a custom folder lists its class ids and dataset.json fields here).
    value_hints: optional `{raw value: text}` added to the message when that value is found
      (a custom folder explains a raw 255 without a declared ignore_index).
  """

  def __init__(self, items: Sequence[FileItem], info: DatasetInfo, *, labeled: bool = True,
               lut: Optional[np.ndarray] = None, rgb_palette: Optional[np.ndarray] = None,
               check_files: bool = True, label_help: Optional[str] = None,
               value_hints: Optional[dict] = None):
    self.items = tuple(items)
    self.info, self.labeled = info, labeled
    self.label_help = label_help
    self.value_hints = dict(value_hints or {})
    self.lut = None if lut is None else np.asarray(lut, np.int16)
    self.rgb_palette = None if rgb_palette is None else np.asarray(rgb_palette, np.uint8)
    if self.lut is not None and (self.lut.shape != (256,) or self.lut.min() < -1
                                 or self.lut.max() > 255):
      raise DataError(f"{info.name}: label lookup table must be [256] values in -1..255")
    if labeled:
      no_label = [it.id for it in self.items if it.label is None]
      if no_label:
        raise DataError(f"{info.name}: {len(no_label)} labeled examples have no label file: "
                        f"{list_problems(no_label)}")
    if check_files:
      missing = [p for it in self.items
                 for p in ((it.image, it.label) if labeled else (it.image,))
                 if not os.path.isfile(p)]
      if missing:
        raise DataError(f"{info.name}: {len(missing)} files not found: {list_problems(missing)}")

  @property
  def ids(self) -> tuple:
    """The examples' ids, in record order."""
    return tuple(it.id for it in self.items)

  def __len__(self) -> int:
    return len(self.items)

  def __getitem__(self, i: int) -> dict:
    item = self.items[int(i)]
    image = image_io.read_image(item.image)
    if self.labeled:
      label = self.read_label(item.label)
      image_io.check_same_size(image, label, item.image, item.label)
    else:
      label = np.full(image.shape[:2], self.info.ignore_index, np.uint8)
    return {"image": image, "label": label, "index": np.int64(item.index)}

  def read_label(self, path: str) -> np.ndarray:
    """Reads, maps (`lut`) and checks one label file of this source: `[H, W]` uint8."""
    label = image_io.read_label(path, rgb_palette=self.rgb_palette)
    if self.lut is not None:
      mapped = self.lut[label]
      if (mapped < 0).any():
        bad = np.unique(label[mapped < 0]).tolist()
        raise LabelValueError(f"{path}: label values {bad} are not valid for {self.info.name}; "
                              f"{self.explain_values(bad)}", path, bad)
      label = mapped.astype(np.uint8)
    return check_label(label, self.info.num_classes, path, self.info.ignore_index)

  def explain_values(self, bad: Sequence[int]) -> str:
    """Which raw label values are valid, and what to do about the values `bad`."""
    text = self.label_help or (f"valid: the class ids ({self.info.describe_classes()}), the "
                               "ignore value or a mapped value")
    hints = [self.value_hints[v] for v in bad if v in self.value_hints]
    return text + "".join(f". {h}" for h in hints)

  def __repr__(self) -> str:
    kind = "labeled" if self.labeled else "unlabeled"
    return f"FileSource({self.info.name}, {len(self)} {kind} records)"


# ---------------------------------------------------------------------------------------------
# Packed array_record datasets (optional, for pods reading from network storage).
#
# A dataset folder is packed once into array_record files through a tensorflow-datasets builder
# (no TensorFlow needed: images are stored as their original encoded bytes in a bytes `Tensor`
# feature, never through `tfds.features.Image`, whose encoder needs TF). Labels are stored as
# lossless PNGs of the final class ids (after any labelIds -> trainIds or ignore remapping).
# `tfds.builder_from_directory(dir).as_data_source(split)` serves the records to grain;
# `PackedSource` decodes them into the standard record format.
# ---------------------------------------------------------------------------------------------

PACKED_VERSION = "1.0.0"
_PACKED_BUILDER = None


def _packed_builder_class():
  """The tfds builder class, created on first use so `import tensorflow_datasets` stays lazy."""
  global _PACKED_BUILDER
  if _PACKED_BUILDER is not None:
    return _PACKED_BUILDER
  import tensorflow_datasets as tfds

  class SemijaxPacked(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Encoded image bytes, PNG label bytes, id and index of a semijax dataset."""
    VERSION = tfds.core.Version(PACKED_VERSION)
    RELEASE_NOTES = {PACKED_VERSION: "semijax packed segmentation records."}

    # tfds looks for checksum files next to the builder's code through `importlib.resources`,
    # which fails for editable installs; this builder downloads nothing, so it has no code path.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
      return None

    def __init__(self, *, splits=None, metadata=None, **kwargs):
      self._pack_splits, self._pack_metadata = splits, metadata
      super().__init__(**kwargs)

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          description="semijax segmentation records (see semijax.data.sources.PackedSource).",
          features=tfds.features.FeaturesDict({
              "id": tfds.features.Text(),
              "index": tfds.features.Tensor(shape=(), dtype=np.int64),
              "image": tfds.features.Tensor(shape=(), dtype=np.object_),
              "label": tfds.features.Tensor(shape=(), dtype=np.object_),
          }),
          metadata=tfds.core.MetadataDict(self._pack_metadata or {}),
          disable_shuffling=True)  # record i of a split is the i-th example given to it

    def _split_generators(self, dl_manager):
      del dl_manager
      return {name: self._generate_examples(src) for name, src in self._pack_splits.items()}

    def _generate_examples(self, src):
      for pos, item in enumerate(src.items):
        with open(item.image, "rb") as f:
          image_bytes = f.read()
        image = image_io.read_image(item.image, data=image_bytes)  # validate before packing
        label_bytes = b""
        if src.labeled:
          label = src.read_label(item.label)
          image_io.check_same_size(image, label, item.image, item.label)
          label_bytes = image_io.encode_png(label)
        yield pos, {"id": item.id, "index": int(item.index), "image": image_bytes,
                    "label": label_bytes}

  _PACKED_BUILDER = SemijaxPacked
  return SemijaxPacked


def pack_sources(sources: dict, out_dir: str) -> str:
  """Packs file sources into array_record files with tensorflow-datasets (no TensorFlow needed).

  Args:
    sources: `{split name: FileSource}` (e.g. `{'train': ..., 'val': ...}`), all of one dataset.
      Pack the *whole* train set once (labeled, so that every split protocol can draw from it)
      and pick protocol subsets when reading with `PackedSource(..., ids=...)`.
    out_dir: output folder; the dataset lands in `out_dir/semijax_packed/1.0.0/`.

  Returns:
    The folder holding `dataset_info.json` and the `*.array_record-*` shards.

  Raises:
    DataError: a file fails to decode or validate (packing stops at the first bad file).
  """
  if not sources:
    raise DataError("pack_sources: no splits given")
  infos = {s.info.name for s in sources.values()}
  if len(infos) != 1:
    raise DataError(f"pack_sources: sources come from different datasets {sorted(infos)}")
  info = next(iter(sources.values())).info
  metadata = {
      "name": info.name, "class_names": list(info.class_names),
      "palette": np.asarray(info.palette, np.uint8).tolist(),
      "ignore_index": int(info.ignore_index),
      "background_class": info.background_class,
      "labeled": {k: bool(s.labeled) for k, s in sources.items()},
      "ids": {k: list(s.ids) for k, s in sources.items()},
  }
  builder = _packed_builder_class()(splits=dict(sources), metadata=metadata, data_dir=out_dir,
                                    file_format="array_record")
  builder.download_and_prepare()
  return os.path.join(out_dir, "semijax_packed", PACKED_VERSION)


class PackedSource:
  """Reads a split packed by `pack_sources`, in the standard record format.

  Args:
    directory: the folder returned by `pack_sources` (or its parent `out_dir`).
    split: tfds split name (`'train'`, `'val'`).
    ids: optional subset (e.g. `SplitSpec.labeled_ids`), in the order given; default all.
    labeled: False gives all-ignore labels (the unlabeled half of a split).
  """

  def __init__(self, directory: str, split: str, *, ids: Optional[Sequence[str]] = None,
               labeled: bool = True):
    if os.path.isdir(os.path.join(directory, "semijax_packed", PACKED_VERSION)):
      directory = os.path.join(directory, "semijax_packed", PACKED_VERSION)
    meta_path = os.path.join(directory, "metadata.json")
    if not os.path.isfile(meta_path):
      raise DataError(f"{directory}: not a packed semijax dataset (no metadata.json); create it "
                      f"with `python -m experiments.prepare_data ... --to-array-record DIR`")
    with open(meta_path) as f:
      meta = json.load(f)
    if split not in meta["ids"]:
      raise DataError(f"{directory}: no split {split!r}; packed splits: {sorted(meta['ids'])}")
    if labeled and not meta["labeled"][split]:
      raise DataError(f"{directory}: split {split!r} was packed without labels")
    self.directory, self.split, self.labeled = directory, split, labeled
    self.info = DatasetInfo(meta["name"], tuple(meta["class_names"]),
                            np.asarray(meta["palette"], np.uint8), int(meta["ignore_index"]),
                            meta.get("background_class"))   # absent in packs before issue 18
    position = {k: i for i, k in enumerate(meta["ids"][split])}
    if ids is None:
      self.positions = np.arange(len(position))
    else:
      missing = [k for k in ids if k not in position]
      if missing:
        raise DataError(f"{directory}: {len(missing)} ids not in packed split {split!r}: "
                        f"{list_problems(missing)}")
      self.positions = np.asarray([position[k] for k in ids], np.int64)
    self._ids = tuple(meta["ids"][split][p] for p in self.positions)
    self._records = None  # opened lazily (and again in each grain worker process)

  def _data_source(self):
    if self._records is None:
      import tensorflow_datasets as tfds
      self._records = tfds.builder_from_directory(self.directory).as_data_source(self.split)
    return self._records

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_records"] = None
    return state

  @property
  def ids(self) -> tuple:
    """The examples' ids, in record order."""
    return self._ids

  def __len__(self) -> int:
    return len(self.positions)

  def __getitem__(self, i: int) -> dict:
    record = self._data_source()[int(self.positions[int(i)])]
    rid = record["id"].decode() if isinstance(record["id"], bytes) else str(record["id"])
    name = f"{self.directory}[{self.split}:{rid}]"
    if rid != self._ids[int(i)]:
      raise DataError(f"{name}: expected record {self._ids[int(i)]!r}; metadata.json and the "
                      f"array_record files disagree (re-pack the dataset)")
    image = image_io.read_image(name + ".image", data=record["image"])
    if self.labeled:
      label = image_io.read_label(name + ".label", data=record["label"])
      image_io.check_same_size(image, label, name + ".image", name + ".label")
      label = check_label(label, self.info.num_classes, name, self.info.ignore_index)
    else:
      label = np.full(image.shape[:2], self.info.ignore_index, np.uint8)
    return {"image": image, "label": label, "index": np.int64(record["index"])}

  def __repr__(self) -> str:
    kind = "labeled" if self.labeled else "unlabeled"
    return f"PackedSource({self.info.name}:{self.split}, {len(self)} {kind} records)"
