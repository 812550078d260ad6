"""Host-side joint image+label transforms (grain `RandomMap`s), NumPy and PIL only.

Only geometric augmentation happens here (random scale, crop, flip): it changes shapes and
must move image and label together. Photometric strong augmentation and CutMix run on the
device inside the train step (`semijax.augment`), where several views cost no host work.

Output records: `image` uint8 [S, S, 3], `label` uint8 [S, S] (255 = ignore, also on
padding), `pad` bool [S, S] (True where the crop fell outside the image), `index` int64.
"""

import dataclasses
from typing import Optional, Tuple

import grain
import numpy as np
from PIL import Image

IGNORE_INDEX = 255


def _resize_pair(image: np.ndarray, label: np.ndarray, height: int, width: int):
  """Bilinear for the image, nearest for the label (the reference codebases' choice)."""
  img = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
  lab = np.asarray(Image.fromarray(label).resize((width, height), Image.NEAREST))
  return img, lab


def pad_to(image: np.ndarray, label: np.ndarray, pad: np.ndarray, height: int, width: int):
  """Pads bottom/right to at least (height, width): image 0, label ignore, pad True.

  `label` is `[H, W]` or `[H, W, k]` (several label maps moved together)."""
  ph, pw = max(height - image.shape[0], 0), max(width - image.shape[1], 0)
  if ph == 0 and pw == 0:
    return image, label, pad
  extra = ((0, 0),) * (label.ndim - 2)
  return (np.pad(image, ((0, ph), (0, pw), (0, 0))),
          np.pad(label, ((0, ph), (0, pw)) + extra, constant_values=IGNORE_INDEX),
          np.pad(pad, ((0, ph), (0, pw)), constant_values=True))


@dataclasses.dataclass(frozen=True)
class TrainAugment(grain.transforms.RandomMap):
  """Random rescale, pad-and-crop to `crop_size`, horizontal flip.

  Attributes:
    crop_size: output side S.
    scale_range: image scale factor drawn uniformly (the papers' 0.5-2.0 on real data).
    base_size: if set, the image is first resized so that its long side is `base_size`
      (CAC's `base_size`; None keeps the original size, as U2PL/UniMatch).
    flip: horizontal flip with probability 0.5.
  """
  crop_size: int
  scale_range: Tuple[float, float] = (0.5, 2.0)
  base_size: Optional[int] = None
  flip: bool = True

  def random_map(self, record: dict, rng: np.random.Generator) -> dict:
    image, label = record["image"], record["label"]
    # A hidden ground truth (unlabeled images with masks, for diagnostics) moves with the
    # label; it is stacked with it so both take exactly the same resize, crop and flip.
    hidden = record.get("hidden_label")
    if hidden is not None:
      label = np.stack([label, hidden], axis=-1)
    h, w = label.shape[:2]
    scale = rng.uniform(*self.scale_range)
    if self.base_size is not None:
      scale *= self.base_size / max(h, w)
    nh, nw = max(int(round(h * scale)), 1), max(int(round(w * scale)), 1)
    if (nh, nw) != (h, w):
      image, label = _resize_pair(image, label, nh, nw)
    pad = np.zeros(label.shape[:2], bool)
    image, label, pad = pad_to(image, label, pad, self.crop_size, self.crop_size)
    y = rng.integers(0, label.shape[0] - self.crop_size + 1)
    x = rng.integers(0, label.shape[1] - self.crop_size + 1)
    window = (slice(y, y + self.crop_size), slice(x, x + self.crop_size))
    image, label, pad = image[window], label[window], pad[window]
    if self.flip and rng.random() < 0.5:
      image, label, pad = image[:, ::-1], label[:, ::-1], pad[:, ::-1]
    out = {"image": np.ascontiguousarray(image), "pad": np.ascontiguousarray(pad),
           "index": record["index"]}
    if hidden is not None:
      out["label"] = np.ascontiguousarray(label[..., 0])
      out["hidden_label"] = np.ascontiguousarray(label[..., 1])
    else:
      out["label"] = np.ascontiguousarray(label)
    return out


@dataclasses.dataclass(frozen=True)
class EvalPad(grain.transforms.Map):
  """Pads to a fixed canvas (image 0, label ignore) so that eval batches have one shape.

  With `size=None` the record keeps its own shape (then batch size must be 1).
  """
  size: Optional[Tuple[int, int]] = None

  def map(self, record: dict) -> dict:
    image, label = record["image"], record["label"]
    pad = np.zeros(label.shape, bool)
    if self.size is not None:
      if label.shape[0] > self.size[0] or label.shape[1] > self.size[1]:
        raise ValueError(f"record {int(record['index'])}: image {label.shape} is larger than "
                         f"the eval canvas {self.size}; raise data.eval_size")
      image, label, pad = pad_to(image, label, pad, *self.size)
    return {"image": image, "label": label, "pad": pad, "index": record["index"]}
