"""The embedded default dataset: digit scenes built from images that ship inside packages.

Every scene is a crop of one of the photographs bundled with scikit-image / scikit-learn,
blurred and toned down, with one to three of scikit-learn's bundled 8x8 handwritten digits
(1797 scans) enlarged and painted on it in a random ink colour. Label = digit + 1 on the
digit's pixels, 0 (background) elsewhere: 11 classes. Nothing is downloaded; the same
`seed` gives the same dataset on every machine (NumPy's PCG64 and PIL resizes only).

Train and val use disjoint digit scans and disjoint halves of each photograph, so val
measures generalisation to unseen writers' digits on unseen backgrounds.

Scene parameters (canvas, digit size, contrast) were tuned so that with the demo's CPU
budget full supervision clears 70 mIoU while 1/16 of the labels is well below (BUILD_NOTES).
"""

import dataclasses
import functools
from typing import Tuple

import numpy as np
from PIL import Image

from semijax import extras
from semijax.data import sources

# What needs the `embedded` extra, in its MissingExtraError.
_PURPOSE = "the embedded dataset (its images ship inside scikit-learn and scikit-image)"

CLASS_NAMES = ("background",) + tuple(f"digit {d}" for d in range(10))
# Background black; digits from a fixed qualitative palette.
PALETTE = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
                    [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230],
                    [210, 245, 60], [250, 190, 212]], np.uint8)

_COLOUR_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry",
                  "hubble_deep_field", "colorwheel")
_GRAY_PHOTOS = ("brick", "grass", "gravel", "camera", "coins", "moon", "page", "text", "clock")


@dataclasses.dataclass(frozen=True)
class SceneConfig:
  """How scenes are drawn; the defaults are the published benchmark."""
  canvas: int = 32                        # scene side in pixels
  num_train: int = 3200                   # fixed train pool
  num_val: int = 640                      # fixed val set
  digits_per_scene: Tuple[int, int] = (1, 1)      # inclusive range
  digit_size: Tuple[int, int] = (20, 30)  # enlarged digit side, inclusive range
  stroke_threshold: float = 0.3           # digit intensity (0..1) above which a pixel is labelled
  background_blur: float = 1.5            # Gaussian sigma applied to the photo crop
  background_contrast: float = 0.3        # photo contrast kept around its mean
  ink_alpha_gain: float = 1.6             # alpha = clip(gain * intensity, 0, 1)
  max_overlap: float = 0.15               # a digit may cover at most this fraction of earlier ones
  placement_tries: int = 20               # positions tried to respect max_overlap
  seed: int = 0


def _photos() -> list:
  """The bundled photographs as float32 RGB in [0, 1]."""
  skimage_data = extras.require("skimage.data", "scikit-image", "embedded", _PURPOSE)
  load_sample_images = extras.require("sklearn.datasets", "scikit-learn", "embedded",
                                      _PURPOSE).load_sample_images
  photos = []
  for name in _COLOUR_PHOTOS:
    im = getattr(skimage_data, name)()[..., :3]
    photos.append(im.astype(np.float32) / 255.0)
  for name in _GRAY_PHOTOS:
    im = getattr(skimage_data, name)().astype(np.float32) / 255.0
    photos.append(np.repeat(im[..., None], 3, axis=-1))
  for im in load_sample_images().images:
    photos.append(im.astype(np.float32) / 255.0)
  return photos


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
  if sigma <= 0:
    return image
  radius = int(np.ceil(3 * sigma))
  x = np.arange(-radius, radius + 1)
  k = np.exp(-0.5 * (x / sigma) ** 2)
  k /= k.sum()
  pad = np.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode="reflect")
  rows = sum(k[i] * pad[i:i + image.shape[0]] for i in range(len(k)))
  return sum(k[i] * rows[:, i:i + image.shape[1]] for i in range(len(k)))


def _resize(array: np.ndarray, size: int, resample) -> np.ndarray:
  img = Image.fromarray(array)
  return np.asarray(img.resize((size, size), resample=resample))


def paint_scenes(num: int, photos: list, photo_half: int, digits: np.ndarray,
                 digit_labels: np.ndarray, cfg: SceneConfig,
                 rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
  """Paints `num` scenes: 8x8 glyphs (counts 0..16) enlarged onto crops of `photos`.

  Args:
    num: scenes to draw.
    photos: float32 RGB `[h, w, 3]` images in [0, 1].
    photo_half: crops come from the left (0) or right (1) half of each photo.
    digits: `[K, 8, 8]` glyphs, counts 0..16 (scikit-learn's digits, or `glyphs`).
    digit_labels: `[K]` class of each glyph; painted as label + 1 (0 = background).
    cfg: canvas, sizes, blur, contrast and ink.
    rng: the generator (consumed in a fixed order: the result is deterministic).

  Returns:
    `(images uint8 [num, S, S, 3], labels uint8 [num, S, S])`.
  """
  s = cfg.canvas
  images = np.zeros((num, s, s, 3), np.uint8)
  labels = np.zeros((num, s, s), np.uint8)
  for n in range(num):
    photo = photos[rng.integers(len(photos))]
    h, w = photo.shape[:2]
    # Train crops come from the left half of each photo, val crops from the right half.
    half_w = w // 2
    crop = int(rng.integers(s, max(s + 1, min(h, half_w) // 2)))
    y0 = rng.integers(0, h - crop + 1)
    x0 = photo_half * half_w + rng.integers(0, half_w - crop + 1)
    patch = (photo[y0:y0 + crop, x0:x0 + crop] * 255).astype(np.uint8)
    bg = _resize(patch, s, Image.BILINEAR).astype(np.float32) / 255.0
    bg = _blur(bg, cfg.background_blur)
    bg = bg.mean() + cfg.background_contrast * (bg - bg.mean())
    canvas, label = bg, np.zeros((s, s), np.uint8)
    for _ in range(rng.integers(cfg.digits_per_scene[0], cfg.digits_per_scene[1] + 1)):
      k = rng.integers(len(digits))
      size = int(rng.integers(cfg.digit_size[0], cfg.digit_size[1] + 1))
      glyph = _resize((digits[k] * (255.0 / 16.0)).astype(np.uint8), size, Image.BICUBIC)
      glyph = np.clip(glyph.astype(np.float32) / 255.0, 0.0, 1.0)
      stroke = glyph > cfg.stroke_threshold
      # Place where the new digit hides little of the earlier ones (fewest overlaps wins).
      best = None
      for _ in range(cfg.placement_tries):
        y, x = rng.integers(0, s - size + 1, size=2)
        covered = np.mean(label[y:y + size, x:x + size][stroke] > 0)
        if best is None or covered < best[0]:
          best = (covered, y, x)
        if covered <= cfg.max_overlap:
          break
      _, y, x = best
      # Ink contrasts with the local background: dark ink on bright areas and vice versa.
      local = canvas[y:y + size, x:x + size].mean()
      ink = rng.uniform(0.0, 0.35, 3) if local > 0.5 else rng.uniform(0.65, 1.0, 3)
      alpha = np.clip(cfg.ink_alpha_gain * glyph, 0.0, 1.0)[..., None]
      region = canvas[y:y + size, x:x + size]
      canvas[y:y + size, x:x + size] = region * (1 - alpha) + ink * alpha
      label[y:y + size, x:x + size][stroke] = digit_labels[k] + 1
    images[n] = np.clip(np.round(canvas * 255), 0, 255).astype(np.uint8)
    labels[n] = label
  return images, labels


@functools.lru_cache(maxsize=4)
def generate(cfg: SceneConfig = SceneConfig()) -> dict:
  """Draws the train pool and val set. Returns `{'train': (images, labels), 'val': ...}`.

  Takes a few seconds; cached per config within a process.
  """
  digits = extras.require("sklearn.datasets", "scikit-learn", "embedded",
                          _PURPOSE).load_digits()
  # Disjoint digit scans: a fixed permutation, 80% for train scenes, 20% for val.
  order = np.random.default_rng(1234).permutation(len(digits.images))
  cut = int(0.8 * len(order))
  photos = _photos()
  rng = np.random.default_rng(cfg.seed)
  train = paint_scenes(cfg.num_train, photos, 0, digits.images[order[:cut]],
                       digits.target[order[:cut]], cfg, rng)
  val = paint_scenes(cfg.num_val, photos, 1, digits.images[order[cut:]],
                     digits.target[order[cut:]], cfg, rng)
  return {"train": train, "val": val}


INFO = sources.DatasetInfo(name="embedded_digits", class_names=CLASS_NAMES, palette=PALETTE,
                            background_class=0)


def make_sources(cfg: SceneConfig = SceneConfig()) -> dict:
  """ArraySources over the whole train pool and the val set (splits select rows later)."""
  data = generate(cfg)
  return {name: sources.ArraySource(images, labels, INFO) for name, (images, labels) in
          data.items()}
