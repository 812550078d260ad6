"""Random-access segmentation sources: the one interface every dataset implements.

A source is a grain `RandomAccessDataSource` (`__len__`, `__getitem__`) whose records are

    {'image': uint8 [H, W, 3], 'label': uint8 [H, W], 'index': int64}

`label` holds class ids in `[0, num_classes)` and `ignore_index` (255); unlabeled sources
return an all-ignore label map so that every record has the same structure. Sources also
carry the dataset's metadata (`DatasetInfo`). Records are validated where they are read, so
a bad file is named at the moment it is met (see `check_label`).
"""

import dataclasses
from typing import Optional, Sequence

import numpy as np

IGNORE_INDEX = 255


class DataError(ValueError):
  """A dataset file, split or record is not what it should be; the message names it."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Metadata of a segmentation dataset."""
  name: str
  class_names: tuple          # C names, index = class id
  palette: np.ndarray         # [C, 3] uint8 colours for visualisation
  ignore_index: int = IGNORE_INDEX

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def check_label(label: np.ndarray, num_classes: int, where: str,
                ignore_index: int = IGNORE_INDEX) -> np.ndarray:
  """Raises `DataError` naming `where` if `label` has values outside [0, C) and ignore."""
  if label.ndim != 2:
    raise DataError(f"{where}: label map must be 2-D [H, W], got shape {label.shape}")
  values = np.unique(label)
  bad = values[(values >= num_classes) & (values != ignore_index)]
  if bad.size:
    raise DataError(f"{where}: label values {bad.tolist()} outside [0, {num_classes}) and "
                    f"ignore {ignore_index}")
  return label


class ArraySource:
  """A source over in-memory arrays (the embedded dataset, tests, small custom sets).

  Args:
    images: `[N, H, W, 3]` uint8.
    labels: `[N, H, W]` uint8, or None for an unlabeled source (all-ignore labels).
    info: dataset metadata.
    indices: optional subset (a split) of the rows, in order.
  """

  def __init__(self, images: np.ndarray, labels: Optional[np.ndarray], info: DatasetInfo,
               indices: Optional[Sequence[int]] = None):
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
      raise DataError(f"{info.name}: images must be uint8 [N, H, W, 3], got "
                      f"{images.dtype} {images.shape}")
    if labels is not None and labels.shape != images.shape[:3]:
      raise DataError(f"{info.name}: labels {labels.shape} do not match images "
                      f"{images.shape[:3]}")
    self.images, self.labels, self.info = images, labels, info
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
    return {"image": image, "label": label, "index": np.int64(row)}

  def __repr__(self) -> str:
    return f"ArraySource({self.info.name}, {len(self)} records)"
