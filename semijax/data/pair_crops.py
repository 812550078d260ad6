"""Two overlapping crops of one unlabeled image (CAC's contextual augmentation), a grain RandomMap.

CAC (Lai et al., CVPR 2021; official `dataloaders/voc.py` `PairVOCDataset`): the image is resized
so that its long side is a random integer in `[lo, hi] x base_size` (bicubic), padded at the
bottom/right to the crop size, and two square crops are drawn:

  * crop 1 at a uniform position;
  * crop 2 at a uniform position whose offset from crop 1 is then rounded down to a multiple of
    the feature stride s (a negative position moves up by one stride), redrawn until the two
    crops' IoU is in `iou_range`, at most `max_tries` times; after that crop 2 = crop 1.

Each crop is flipped horizontally with probability 1/2, independently. Photometric ("low-level")
augmentation is per crop too; it runs on the device (`semijax.augment.photometric`, preset 'cac'),
so it is not done here.

Output record (what `semijax.sampling.overlap.pair_views` needs to align the overlap
pixel-to-pixel at stride s):

  `image`, `image2` uint8 [S, S, 3]   the two crops (as flipped)
  `pad`, `pad2` bool [S, S]           True on padding
  `label` uint8 [S, S]                all ignore (unlabeled records keep one structure)
  `pair_boxes` int32 [2, 4]           (top, left, bottom, right) of each crop in the resized,
                                      padded image
  `pair_flips` bool [2]               whether each crop was flipped
  `pair_stride` int32 []              s (offsets between the boxes are multiples of it)
  `hidden_label` uint8 [S, S, 2]      (only if the record has one) both crops' hidden ground
                                      truth, for diagnostics; never read by a loss
  `<field>`, `<field>2` uint8 [S, S]  for each name in `label_fields` present in the record
                                      (e.g. CAC's image-level pseudo-labels `weak_label`)
  `index`

Deviation from the official code, by design: a rounded crop-2 position that would leave the
image (possible only when the image is less than one stride larger than the crop) is moved back
by one stride instead of producing a smaller crop.
"""

import dataclasses
from typing import Optional, Sequence, Tuple

import grain
import numpy as np
from PIL import Image

IGNORE_INDEX = 255


def crop_iou(offset_y: int, offset_x: int, size: int) -> float:
  """IoU of two `size x size` squares offset by `(offset_y, offset_x)` pixels."""
  inter = max(size - abs(offset_y), 0) * max(size - abs(offset_x), 0)
  return inter / (2 * size * size - inter)


def _second_position(rng: np.random.Generator, first: int, limit: int, stride: int) -> int:
  """A uniform position in [0, limit], its offset from `first` rounded down to a multiple of
  `stride` (official), kept inside [0, limit]."""
  pos = int(rng.integers(0, limit + 1))
  pos = (pos - first) // stride * stride + first
  if pos < 0:
    pos += stride
  while pos > limit:   # only when limit < stride (see the module docstring)
    pos -= stride
  return pos


def sample_pair_boxes(rng: np.random.Generator, height: int, width: int, crop: int, *,
                      stride: int = 8, iou_range: Tuple[float, float] = (0.1, 1.0),
                      max_tries: int = 50) -> Tuple[Tuple[int, int], Tuple[int, int], int]:
  """Top-left corners of two `crop x crop` crops of a `height x width` (padded) image.

  Args:
    rng: NumPy generator.
    height, width: image size, each `>= crop`.
    crop: crop side S.
    stride: feature stride s; crop 2's offset from crop 1 is a multiple of it.
    iou_range: accepted IoU of the two crops, inclusive.
    max_tries: draws of crop 2 before falling back to crop 2 = crop 1.

  Returns:
    `((y1, x1), (y2, x2), tries)`: `tries` is the number of draws made (`max_tries + 1` when
    it fell back).
  """
  if height < crop or width < crop:
    raise ValueError(f"image {height}x{width} is smaller than the crop {crop}; pad it first")
  y1 = int(rng.integers(0, height - crop + 1))
  x1 = int(rng.integers(0, width - crop + 1))
  for k in range(max_tries):
    x2 = _second_position(rng, x1, width - crop, stride)
    y2 = _second_position(rng, y1, height - crop, stride)
    if iou_range[0] <= crop_iou(y2 - y1, x2 - x1, crop) <= iou_range[1]:
      return (y1, x1), (y2, x2), k + 1
  return (y1, x1), (y1, x1), max_tries + 1


def _resize(array: np.ndarray, height: int, width: int, resample) -> np.ndarray:
  """PIL resize of `[H, W]` or `[H, W, k]` uint8 arrays (channel by channel when k > 4)."""
  if array.ndim == 3 and array.shape[-1] not in (3, 4):
    return np.stack([_resize(array[..., c], height, width, resample)
                     for c in range(array.shape[-1])], -1)
  return np.asarray(Image.fromarray(array).resize((width, height), resample))


@dataclasses.dataclass(frozen=True)
class PairCrops(grain.transforms.RandomMap):
  """CAC's overlapping two-crop sampler (see the module docstring).

  Attributes:
    crop_size: S, the side of both crops (a multiple of `stride`).
    scale_range: the resized image's long side is a random integer in
      `[lo * base_size, hi * base_size]` (official unlabeled range 0.8-2.0), or, without
      `base_size`, the image is scaled by a uniform factor in the range.
    base_size: CAC's `base_size` (VOC 400, Cityscapes 2048); None keeps the image's size as
      the base.
    stride: feature stride s of the maps that will be compared (8: DeepLabv3+ features
      2 x 2-pooled).
    iou_range: accepted IoU of the two crops (official [0.1, 1.0]; [1, 1] = no context change).
    max_tries: draws of crop 2 before crop 2 = crop 1 (official 50).
    flip: independent horizontal flips with probability 1/2.
    label_fields: extra per-pixel uint8 fields of the record cropped and flipped with each crop
      (missing ones are skipped).
  """
  crop_size: int
  scale_range: Tuple[float, float] = (0.8, 2.0)
  base_size: Optional[int] = None
  stride: int = 8
  iou_range: Tuple[float, float] = (0.1, 1.0)
  max_tries: int = 50
  flip: bool = True
  label_fields: Sequence[str] = ("weak_label",)

  def __post_init__(self):
    if self.crop_size % self.stride:
      raise ValueError(f"crop_size={self.crop_size} is not a multiple of stride={self.stride}: "
                       "the overlap would not fall on whole feature pixels")
    lo, hi = self.iou_range
    if not 0.0 <= lo <= hi <= 1.0:
      raise ValueError(f"iou_range={self.iou_range}: expected 0 <= lo <= hi <= 1")

  def random_map(self, record: dict, rng: np.random.Generator) -> dict:
    image = record["image"]
    h, w = image.shape[:2]
    # Per-pixel maps that travel with the image: hidden truth and the extra label fields.
    maps = {}
    if record.get("hidden_label") is not None:
      maps["hidden_label"] = record["hidden_label"]
    for name in self.label_fields:
      if record.get(name) is not None:
        maps[name] = record[name]
    names = list(maps)
    stack = (np.stack([maps[n] for n in names], -1) if names
             else np.zeros((h, w, 0), np.uint8))

    if self.base_size:
      lo, hi = self.scale_range
      long_side = int(rng.integers(int(self.base_size * lo), int(self.base_size * hi) + 1))
      nh, nw = ((long_side, int(long_side * w / h + 0.5)) if h > w
                else (int(long_side * h / w + 0.5), long_side))
    else:
      scale = rng.uniform(*self.scale_range)
      nh, nw = max(int(round(h * scale)), 1), max(int(round(w * scale)), 1)
    if (nh, nw) != (h, w):
      image = _resize(image, nh, nw, Image.BICUBIC)
      if names:
        stack = _resize(stack, nh, nw, Image.NEAREST).reshape(nh, nw, len(names))
    s = self.crop_size
    ph, pw = max(s - nh, 0), max(s - nw, 0)
    pad = np.zeros((nh, nw), bool)
    if ph or pw:
      image = np.pad(image, ((0, ph), (0, pw), (0, 0)))
      stack = np.pad(stack, ((0, ph), (0, pw), (0, 0)), constant_values=IGNORE_INDEX)
      pad = np.pad(pad, ((0, ph), (0, pw)), constant_values=True)

    (y1, x1), (y2, x2), _ = sample_pair_boxes(
        rng, image.shape[0], image.shape[1], s, stride=self.stride, iou_range=self.iou_range,
        max_tries=self.max_tries)
    flips = [bool(self.flip and rng.random() < 0.5) for _ in range(2)]
    out = {"label": np.full((s, s), IGNORE_INDEX, np.uint8), "index": record["index"],
           "pair_boxes": np.array([[y1, x1, y1 + s, x1 + s], [y2, x2, y2 + s, x2 + s]],
                                  np.int32),
           "pair_flips": np.array(flips, bool), "pair_stride": np.int32(self.stride)}
    crops = []
    for (y, x), flip in zip(((y1, x1), (y2, x2)), flips):
      window = (slice(y, y + s), slice(x, x + s))
      parts = [image[window], pad[window], stack[window]]
      if flip:
        parts = [p[:, ::-1] for p in parts]
      crops.append([np.ascontiguousarray(p) for p in parts])
    (img1, pad1, st1), (img2, pad2, st2) = crops
    out.update(image=img1, image2=img2, pad=pad1, pad2=pad2)
    for k, name in enumerate(names):
      if name == "hidden_label":
        out[name] = np.ascontiguousarray(np.stack([st1[..., k], st2[..., k]], -1))
      else:
        out[name], out[name + "2"] = st1[..., k], st2[..., k]
    return out
